"""Fine-tuning a model to close the knowing-doing gap, and its checkpoints.

- :mod:`~kdgap.training.cloning`: :func:`clone`, thought cloning and behaviour cloning
  (supervised fine-tuning on a UCB expert's play in the model's own format),
  :func:`expert_examples`, :func:`action_match_rate`.
- :mod:`~kdgap.training.rlft`: :func:`rlft`, RL fine-tuning on the model's own play (GRPO
  advantages, PPO clipping, KL to the start), :class:`RlftConfig`.
- :mod:`~kdgap.training.checkpoint`: :func:`save_checkpoint`, :func:`load_checkpoint`
  (safetensors + JSON, sha256-checked, no pickle), :class:`CheckpointError`.
- :mod:`~kdgap.training.export`: :func:`save_finetuned`, the result where kdgap loads
  models from.
- :mod:`~kdgap.training.lora`: :func:`add_lora`, :func:`merge_lora` (peft LoRA adapters
  inside a bridge-wrapped Hugging Face model).
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
from kdgap.training.lora import add_lora, merge_lora
from kdgap.training.rlft import RlftConfig, rlft

__all__ = [
    "CLONING",
    "CheckpointError",
    "CloneConfig",
    "RlftConfig",
    "action_match_rate",
    "add_lora",
    "clone",
    "expert_examples",
    "load_checkpoint",
    "merge_lora",
    "rlft",
    "save_checkpoint",
    "save_finetuned",
]
