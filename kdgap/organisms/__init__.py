"""Model organisms: small transformers trained with a known knowing-doing mechanism.

See :mod:`~kdgap.organisms.language` (transcript language), :mod:`~kdgap.organisms.transcript`
(:class:`OrganismFormat`), :mod:`~kdgap.organisms.mechanisms` (planted action rules),
:mod:`~kdgap.organisms.train` and :mod:`~kdgap.organisms.registry` (:func:`load_organism`).
"""

from kdgap.organisms.language import OrganismLanguage
from kdgap.organisms.mechanisms import MECHANISMS, Mechanism, get_mechanism
from kdgap.organisms.registry import (
    finetuned_names,
    list_organisms,
    load_organism,
    shipped_names,
)
from kdgap.organisms.train import TrainConfig, train_organism
from kdgap.organisms.transcript import OrganismFormat

__all__ = [
    "MECHANISMS",
    "Mechanism",
    "OrganismFormat",
    "OrganismLanguage",
    "TrainConfig",
    "finetuned_names",
    "get_mechanism",
    "list_organisms",
    "load_organism",
    "shipped_names",
    "train_organism",
]
