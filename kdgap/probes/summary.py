"""Report-layer entry point: the knowing-doing analysis of a store as one JSON-ready dict.

:func:`knowing_doing_summary` runs :func:`kdgap.probes.knowing_doing` (rare classes dropped
and recorded, since real runs have arms that are almost never picked) and flattens its
tables into per-layer lists of plain floats, so report figures, JSON files and README
tables read one structure. The causal counterpart is
:func:`kdgap.probes.steering.steering_summary`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from kdgap.probes.dataset import ActivationSource
from kdgap.probes.knowing_doing import TRACKED, knowing_doing

#: The divergence layer, in one sentence (``definition`` of the summary).
DIVERGENCE_DEFINITION = (
    "The divergence layer is the first layer L (in residual-stream order) such that at L "
    "and at every later layer, on the held-out disagreement steps (rationale arm != action), "
    "the doing probe predicts the action better than the knowing probe's prediction of the "
    "rationale arm does (lower 95% episode-bootstrap bound of the paired accuracy "
    "difference > 0) and above chance (lower bound of the doing accuracy > the training "
    "disagreement steps' majority-action rate); null when the last layer does not diverge "
    "or there are too few disagreement steps."
)


def _num(x) -> float | None:
    """A float for JSON: NaN / None / pandas NA -> None."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _col(df, name: str) -> list[float | None]:
    return [_num(v) for v in df[name]] if name in df else [None] * len(df)


def _ci(df, name: str) -> list[list[float | None]]:
    return [[a, b] for a, b in zip(_col(df, f"{name}_low"), _col(df, f"{name}_high"))]


def _resolve_hooks(store: ActivationSource, hook) -> list[str]:
    """``None``/``"resid_post"`` -> every ``*hook_resid_post``; a name or list -> as given."""
    if hook is None or hook == "resid_post":
        hooks = [h for h in store.hooks if h.endswith("hook_resid_post")]
        if not hooks:
            raise ValueError(
                f"hook={hook!r}: the store has no resid_post hooks (it has {store.hooks!r}); "
                "pass hook=<a recorded hook name> or a list of them."
            )
        return hooks
    return [hook] if isinstance(hook, str) else list(hook)


def knowing_doing_summary(
    store: ActivationSource,
    *,
    site: str = "action",
    hook: str | Sequence[str] | None = None,
    seed: int = 0,
    knowing: str = "rationale_arm",
    doing: str = "action",
    rare_classes: str = "drop",
    min_class_count: int = 10,
    n_boot: int = 1000,
    trainer: str = "batched",
) -> dict:
    """Knowing vs doing probes per layer at ``site``, as a JSON-ready dict.

    Args:
        store: any :class:`~kdgap.probes.dataset.ActivationSource` (e.g. an
            :class:`~kdgap.hooks.store.ActivationStore`).
        site: recorded site; ``"action"`` is the position whose next token is the action.
        hook: None or ``"resid_post"`` for every recorded ``hook_resid_post`` (one per
            layer), or a hook name / list of names.
        seed: split, inner folds and bootstrap seed.
        knowing, doing: label columns of the two probes.
        rare_classes: ``"drop"`` (default here; listed under ``dropped_classes``) or
            ``"raise"``, see :func:`kdgap.probes.sweep`.
        min_class_count, n_boot, trainer: as :func:`kdgap.probes.knowing_doing`.

    Returns:
        A dict whose per-layer entries are lists aligned with ``layers``:

        - ``layers`` (block indices), ``hooks``, ``site``;
        - ``knowing_acc``, ``knowing_ci``, ``doing_acc``, ``doing_ci``: held-out accuracy
          and 95% episode-bootstrap interval ``[low, high]`` on all test steps;
        - ``knowing_acc_disagree``, ``knowing_ci_disagree``, ``doing_acc_disagree``,
          ``doing_ci_disagree``: the same on the disagreement subset (None when empty);
        - ``agreement``: share of test steps where the two probes predict the same arm;
        - ``chance``: ``{"knowing", "doing", "disagree"}`` majority-class rates;
        - ``divergence_layer`` (int or None), ``definition`` (one sentence);
        - ``n_test``, ``n_disagree``: test steps, and those in the disagreement subset;
        - ``tracking``: on the disagreement subset, the share of the doing probe's
          predictions equal to each of ``rationale_arm``, ``ucb_arm``, ``greedy_arm`` and
          ``frequent_arm``: ``{"layer", "tracks", "shares"}`` at the last layer plus
          ``"per_layer": {target: [share per layer]}`` and ``"tracks_per_layer"``;
        - ``cosines``: ``{"mean": [per layer], "per_arm": {arm: [per layer]}}`` cosine
          between the knowing and doing probes' weight directions;
        - ``best_knowing_layer``, ``best_knowing_acc``; ``dropped_classes``
          (``{label: {class: count}}``).
    """
    hooks = _resolve_hooks(store, hook)
    rep = knowing_doing(store, site=site, hooks=hooks, knowing=knowing, doing=doing,
                        trainer=trainer, min_class_count=min_class_count,
                        rare_classes=rare_classes, n_boot=n_boot, seed=seed)  # fmt: skip
    pl = rep.per_layer
    layers = [None if v is None or v != v else int(v) for v in pl["layer"]]
    best = int(np.nanargmax(pl["knowing_acc"].to_numpy(float)))
    tr = rep.tracking
    per_layer_share = {
        t: [_num(tr[(tr["hook"] == h) & (tr["target"] == t)]["share"].iloc[0])
            if len(tr) and ((tr["hook"] == h) & (tr["target"] == t)).any() else None
            for h in pl["hook"]]
        for t in TRACKED
    }  # fmt: skip
    last_shares = {t: v[-1] for t, v in per_layer_share.items()}
    cos = rep.cosines
    per_arm = {}
    mean_cos = []
    for h in pl["hook"]:
        c = cos[cos["hook"] == h] if len(cos) else cos
        mean_cos.append(_num(c["cosine"].mean()) if len(c) else None)
    if len(cos):
        for arm in sorted(cos["arm"].unique()):
            per_arm[str(int(arm))] = [
                _num(cos[(cos["hook"] == h) & (cos["arm"] == arm)]["cosine"].mean())
                for h in pl["hook"]
            ]
    last = pl.iloc[-1]
    return {
        "site": site,
        "hooks": list(pl["hook"]),
        "layers": layers,
        "knowing_acc": _col(pl, "knowing_acc"),
        "knowing_ci": _ci(pl, "knowing_acc"),
        "doing_acc": _col(pl, "doing_acc"),
        "doing_ci": _ci(pl, "doing_acc"),
        "knowing_acc_disagree": _col(pl, "knowing_acc_dis"),
        "knowing_ci_disagree": _ci(pl, "knowing_acc_dis"),
        "doing_acc_disagree": _col(pl, "doing_acc_dis"),
        "doing_ci_disagree": _ci(pl, "doing_acc_dis"),
        "agreement": _col(pl, "agreement"),
        "chance": {
            "knowing": _num(last["knowing_chance"]),
            "doing": _num(last["doing_chance"]),
            "disagree": _num(last["chance_dis"]),
        },  # fmt: skip
        "divergence_layer": rep.divergence_layer,
        "definition": DIVERGENCE_DEFINITION,
        "n_test": int(last["n_test"]),
        "n_disagree": int(last["n_dis"]),
        "tracking": {
            "layer": layers[-1],
            "tracks": last["tracks"] if isinstance(last["tracks"], str) else None,
            "shares": last_shares,
            "per_layer": per_layer_share,
            "tracks_per_layer": [t if isinstance(t, str) else None for t in pl["tracks"]],
        },
        "cosines": {"mean": mean_cos, "per_arm": per_arm},
        "best_knowing_layer": layers[best],
        "best_knowing_acc": _num(pl["knowing_acc"].iloc[best]),
        "dropped_classes": {
            lab: {str(c): n for c, n in d.items()} for lab, d in rep.dropped_classes.items()
        },  # fmt: skip
    }
