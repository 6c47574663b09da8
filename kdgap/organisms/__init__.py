"""Model organisms: small transformers trained with a known knowing-doing mechanism.

See :mod:`kdgap.organisms.language` (transcript language), :mod:`.format`
(:class:`OrganismFormat`), :mod:`.mechanisms` (planted action rules), :mod:`.train` and
:mod:`.registry` (:func:`load_organism`). Heavy imports (torch, transformer_lens) happen
only when a model is built or loaded.
"""

from kdgap.organisms.format import OrganismFormat
from kdgap.organisms.language import OrganismLanguage
from kdgap.organisms.mechanisms import MECHANISMS, Mechanism, get_mechanism
from kdgap.organisms.registry import list_organisms, load_organism, shipped_names

__all__ = [
    "MECHANISMS",
    "Mechanism",
    "OrganismFormat",
    "OrganismLanguage",
    "get_mechanism",
    "list_organisms",
    "load_organism",
    "shipped_names",
    "train_organism",
]


def __getattr__(name: str):
    # train_organism pulls in torch; import it lazily so `kdgap organisms list` stays fast.
    if name in ("train_organism", "TrainConfig"):
        from kdgap.organisms import train

        return getattr(train, name)
    raise AttributeError(f"module 'kdgap.organisms' has no attribute {name!r}")
