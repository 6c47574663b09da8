"""What the probes read: the activation-store surface, and the checks made before fitting.

- :class:`ActivationSource`: the read surface of an activation store, and
  :data:`DEFAULT_LABELS`, the label columns a sweep fits by default;
- :func:`layer_of`, :func:`residual_order`: hook names -> block index, residual-stream order;
- :func:`check_hooks_sites`, :func:`check_labels`: refuse hooks, sites or labels the store
  lacks;
- :func:`label_array`: a label column as integer classes (-1 = missing);
- :func:`check_class_counts`, :func:`handle_rare_classes`, :func:`format_dropped`: the
  ``rare_classes`` policy ("raise" or "drop") and how dropped classes are recorded.

Probes depend on the small :class:`ActivationSource` protocol rather than on
:mod:`kdgap.hooks.store` itself, so they work with the on-disk store, with the in-memory
:class:`kdgap.testing.synthetic.SyntheticStore` used in tests and benchmarks, or with anything
else exposing the same four members. Every check here raises an error that names the
parameter, the offending value and the fix, because a sweep that dies half-way through an
hour of fitting with ``KeyError: 3`` is worse than useless.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

#: Labels a sweep fits by default (columns of the store's label table).
DEFAULT_LABELS: tuple[str, ...] = (
    "rationale_arm",
    "action",
    "ucb_arm",
    "greedy_arm",
    "frequent_arm",
)

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")
# Order of hook points inside one block, so that "layer order" is residual-stream order.
_WITHIN_BLOCK = ("hook_resid_pre", "attn", "hook_attn_out", "hook_resid_mid", "mlp",
                 "hook_mlp_out", "hook_resid_post")  # fmt: skip


@runtime_checkable
class ActivationSource(Protocol):
    """The read surface of an activation store (see :mod:`kdgap.hooks.store`).

    ``load(hook, site)`` returns ``acts: Float[Tensor, "n_examples d_model"]`` and a label
    table with one row per example (columns episode, step, action, rationale_arm, ...).
    """

    @property
    def hooks(self) -> list[str]: ...

    @property
    def sites(self) -> list[str]: ...

    @property
    def labels(self) -> pd.DataFrame: ...

    def load(
        self, hook: str, site: str
    ) -> tuple[Float[torch.Tensor, "n_examples d_model"], pd.DataFrame]: ...


def layer_of(hook: str) -> int | None:
    """Block index of a transformer-lens hook name (``blocks.3.hook_resid_post`` -> 3).

    Hooks outside the blocks (``hook_embed``, ``ln_final.hook_normalized``) return None.
    """
    m = _LAYER_RE.match(hook)
    return int(m.group(1)) if m else None


def residual_order(hooks: Sequence[str]) -> list[str]:
    """Sort hook names in the order the residual stream passes them.

    Embedding hooks first, then by block index and position inside the block, then the
    rest (final norm, unembedding) in their given order.
    """

    def key(item: tuple[int, str]) -> tuple[int, int, int, int]:
        i, h = item
        layer = layer_of(h)
        if layer is None:
            return (0 if "embed" in h and "unembed" not in h else 2, 0, 0, i)
        within = next((j for j, s in enumerate(_WITHIN_BLOCK) if s in h), len(_WITHIN_BLOCK))
        return (1, layer, within, i)

    return [h for _, h in sorted(enumerate(hooks), key=key)]


def check_hooks_sites(
    source: ActivationSource, hooks: Sequence[str] | None, sites: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """Resolve ``hooks``/``sites`` (None = all recorded) and refuse any that were not recorded."""
    recorded_h, recorded_s = list(source.hooks), list(source.sites)
    hooks = recorded_h if hooks is None else list(hooks)
    sites = recorded_s if sites is None else list(sites)
    for name, asked, have in (("hooks", hooks, recorded_h), ("sites", sites, recorded_s)):
        missing = [x for x in asked if x not in have]
        if missing:
            raise ValueError(
                f"{name}={missing!r}: not recorded in this store (it has {have!r}). "
                f"Pick from those, or record them first (kdgap record --{name} ...)."
            )
        if not asked:
            raise ValueError(f"{name}=[]: nothing to probe; pass at least one recorded {name}.")
    return hooks, sites


def check_labels(table: pd.DataFrame, labels: Sequence[str]) -> list[str]:
    """Refuse label names that are not columns of the store's label table."""
    labels = [labels] if isinstance(labels, str) else list(labels)
    missing = [lab for lab in labels if lab not in table.columns]
    if missing:
        raise KeyError(
            f"labels={missing!r}: not in the store's label table (columns: "
            f"{list(table.columns)!r}). Pick from those, or re-record with a runner that "
            f"writes them."
        )
    if "episode" not in table.columns:
        raise KeyError(
            "the store's label table has no 'episode' column, so probes cannot split by "
            "episode; re-record with episode ids (splitting by step would leak)."
        )
    return labels


def label_array(table: pd.DataFrame, label: str) -> Int[np.ndarray, " n_examples"]:
    """A label column as integer classes, with missing values as -1."""
    col = table[label]
    if col.dtype == bool or str(col.dtype) == "boolean":
        col = col.astype("Int64")
    values = pd.to_numeric(col, errors="raise").astype("Float64")
    if (values.dropna() < 0).any() or (values.dropna() % 1 != 0).any():
        raise ValueError(
            f"label={label!r}: probes need non-negative integer classes (arm indices); "
            f"got values like {values.dropna().unique()[:5].tolist()}. Map them to 0..K-1."
        )
    return values.fillna(-1).to_numpy(dtype=np.int64)


def check_class_counts(y: Int[np.ndarray, " n_examples"], *, label: str, min_count: int) -> None:
    """Refuse labels with a class rarer than ``min_count`` (missing values, -1, ignored).

    Inner cross-validation needs every class in every training fold, and an accuracy on a
    class seen a handful of times is noise.
    """
    classes, counts = np.unique(y[y >= 0], return_counts=True)
    if len(classes) < 2:
        raise ValueError(
            f"label={label!r} has {len(classes)} class(es) {classes.tolist()} among its "
            f"{int((y >= 0).sum())} non-missing examples; a probe needs at least 2. "
            "Record more episodes or drop this label."
        )
    rare = {int(c): int(n) for c, n in zip(classes, counts) if n < min_count}
    if rare:
        raise ValueError(
            f"label={label!r}: too few examples per class {rare} (class: count), "
            f"min_class_count={min_count}. Record more episodes, pass rare_classes='drop' "
            "to leave those classes out (recorded in the results), or lower "
            "min_class_count (accuracies on rare classes are noise)."
        )


RARE_CLASSES = ("raise", "drop")


def handle_rare_classes(
    y: Int[np.ndarray, " n_examples"], *, label: str, min_count: int, rare_classes: str = "raise"
) -> tuple[Int[np.ndarray, " n_examples"], dict[int, int]]:
    """Apply the ``rare_classes`` policy to one label, then :func:`check_class_counts`.

    ``rare_classes="raise"`` (the default everywhere) refuses a class with fewer than
    ``min_count`` examples. ``"drop"`` marks every example of such a class as missing (-1)
    for this label, so its cells are fitted and scored on the remaining classes only; the
    dropped classes and counts are returned so callers record them next to the results
    (on real data a rarely chosen arm, e.g. one the organisms almost never pick, would
    otherwise stop a whole sweep). At least 2 classes must remain either way.

    Args:
        y: ``Int[ndarray, " n_examples"]`` labels, -1 = missing.
        label, min_count: as :func:`check_class_counts`.
        rare_classes: ``"raise"`` or ``"drop"``.

    Returns:
        ``(y, dropped)``: labels (a copy with dropped classes set to -1 under ``"drop"``) and
        ``{class: count}`` of the dropped classes (empty under ``"raise"``).
    """
    if rare_classes not in RARE_CLASSES:
        raise ValueError(
            f"rare_classes={rare_classes!r}: use 'raise' (refuse classes rarer than "
            "min_class_count) or 'drop' (leave their examples out of that label's cells)."
        )
    dropped: dict[int, int] = {}
    if rare_classes == "drop":
        classes, counts = np.unique(y[y >= 0], return_counts=True)
        dropped = {int(c): int(n) for c, n in zip(classes, counts) if n < min_count}
        if dropped:
            y = np.where(np.isin(y, list(dropped)), -1, y)
    check_class_counts(y, label=label, min_count=min_count)
    return y, dropped


def format_dropped(dropped: dict[int, int]) -> str:
    """``{3: 14, 1: 2}`` -> ``"1:2,3:14"`` (class:count, the table's ``dropped_classes``)."""
    return ",".join(f"{c}:{n}" for c, n in sorted(dropped.items()))
