"""Fine-tuning a model to close the knowing-doing gap, and its checkpoints.

- :mod:`~kdgap.training.cloning`: :func:`clone`, thought cloning and behaviour cloning
  (supervised fine-tuning on a UCB expert's play in the model's own format),
  :func:`expert_examples`, :func:`action_match_rate`.
- :mod:`~kdgap.training.checkpoint`: :func:`save_checkpoint`, :func:`load_checkpoint`
  (safetensors + JSON, sha256-checked, no pickle), :class:`CheckpointError`.
- :mod:`~kdgap.training.export`: :func:`save_finetuned`, the result where kdgap loads
  models from.
"""

from kdgap.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kdgap.training.cloning import (
    CLONING,
    CloneConfig,
    action_match_rate,
    clone,
    expert_examples,
)
from kdgap.training.export import save_finetuned

__all__ = [
    "CLONING",
    "CheckpointError",
    "CloneConfig",
    "action_match_rate",
    "clone",
    "expert_examples",
    "load_checkpoint",
    "save_checkpoint",
    "save_finetuned",
]
