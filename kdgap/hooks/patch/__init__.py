"""Activation patching, path patching, attribution and mediation, on one patch core.

- :mod:`~kdgap.hooks.patch.core`: :func:`capture` / :func:`capture_hook` (read
  activations), the setters :func:`set_at` / :func:`edit_at` (write them at chosen entries),
  :func:`run_rows` (many patched rows per forward) and the metric :class:`LogitDiff`.
- :mod:`~kdgap.hooks.patch.sweep`: :func:`patch_sweep`, layer x position [x head] patching,
  exact against ``transformer_lens.patching``, on one of :data:`ENGINES`.
- :mod:`~kdgap.hooks.patch.suffix`: the native engine: a patched row of a native model
  (``boot_native``, the organisms) recomputed from its layer and position only, with the
  base run's keys and values for the prefix (:data:`SUFFIX_SITES`).
- :mod:`~kdgap.hooks.patch.path`: :func:`path_patch`, sender -> receiver attention paths.
- :mod:`~kdgap.hooks.patch.attribution`: :func:`attribution_sweep`, the gradient screen,
  and :func:`verify_top_k`.
- :mod:`~kdgap.hooks.patch.pairs`: counterfactual pairs (:func:`make_pair`,
  :func:`pairs_from_records`, :func:`tokenize_pairs`).
- :mod:`~kdgap.hooks.patch.mediation`: :func:`mediation_summary` and
  :func:`example_heatmap`, the numbers and the heatmap of the report.
"""

from kdgap.hooks.patch.attribution import Attribution, TopKCheck, attribution_sweep, verify_top_k
from kdgap.hooks.patch.core import (
    PATCH_SITES,
    LogitDiff,
    capture,
    capture_hook,
    edit_at,
    entries,
    hook_name,
    run_rows,
    set_at,
)
from kdgap.hooks.patch.mediation import (
    DEFINITION,
    MediationResult,
    example_heatmap,
    flip_mediation,
    mediation,
    mediation_summary,
    ratio_ci,
)
from kdgap.hooks.patch.pairs import (
    PAIR_KINDS,
    CounterfactualPair,
    PairBatch,
    RecordPair,
    format_history,
    make_pair,
    pairs_from_records,
    span_mask,
    tokenize_pairs,
)
from kdgap.hooks.patch.path import PathResult, path_patch
from kdgap.hooks.patch.suffix import SUFFIX_SITES
from kdgap.hooks.patch.sweep import DIRECTIONS, ENGINES, PatchResult, make_cells, patch_sweep

__all__ = [
    "DEFINITION",
    "DIRECTIONS",
    "ENGINES",
    "PAIR_KINDS",
    "PATCH_SITES",
    "SUFFIX_SITES",
    "Attribution",
    "CounterfactualPair",
    "LogitDiff",
    "MediationResult",
    "PairBatch",
    "PatchResult",
    "PathResult",
    "RecordPair",
    "TopKCheck",
    "attribution_sweep",
    "capture",
    "capture_hook",
    "edit_at",
    "entries",
    "example_heatmap",
    "flip_mediation",
    "format_history",
    "hook_name",
    "make_cells",
    "make_pair",
    "mediation",
    "mediation_summary",
    "pairs_from_records",
    "patch_sweep",
    "path_patch",
    "ratio_ci",
    "run_rows",
    "set_at",
    "span_mask",
    "tokenize_pairs",
    "verify_top_k",
]
