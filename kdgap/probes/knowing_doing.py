"""The knowing-doing analysis: where, layer by layer, the action parts from the rationale.

At one site (the action token by default), for every layer:

- the **knowing probe** decodes the rationale's arm and the **doing probe** decodes the
  action, both trained on all (non-missing) training steps and scored on held-out episodes,
  on all steps and on the **disagreement subset** D (test steps where rationale arm !=
  action);
- ``agreement``: the share of test steps where the two probes predict the same arm;
- ``cosine``: per arm, the cosine between the two probes' input-space weight directions;
- ``tracking``: on D, the share of the doing probe's predictions equal to the rationale's
  arm, the true UCB arm recomputed from the history (a model can compute and use UCB
  without reading its rationale), the greedy arm and the most-frequent arm (``tracks``
  names the largest);
- the **divergence layer** (below).

Divergence layer, precisely. On D, for each layer l, let ``doing(l)`` = accuracy of the
doing probe at predicting the action and ``knowing_as_action(l)`` = accuracy of the knowing
probe's predictions *used as predictions of the action* (how well "what the model holds
as the rationale's conclusion" predicts what it does). With 95% intervals from resampling
test episodes (paired, the same resamples for both), layer l *diverges* when

  (i) the lower bound of ``doing(l) - knowing_as_action(l)`` is > 0, and
  (ii) the lower bound of ``doing(l)`` exceeds the chance level on D (the training
       disagreement steps' majority action, scored on test D).

The divergence layer is the first layer (in residual-stream order) from which every later
layer diverges too, or None when the last layer does not diverge, when D is empty, or
when D is too small for an interval. A faithful model has D empty or the action
undecodable beyond the rationale on D (None); a model whose action reads something else
than its rationale gets the layer where that other information takes over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kdgap.probes.batched import fit_logistic_batched
from kdgap.probes.dataset import (
    ActivationSource,
    check_class_counts,
    check_hooks_sites,
    check_labels,
    handle_rare_classes,
    label_array,
    layer_of,
    residual_order,
)
from kdgap.probes.estimators import DEFAULT_CS, LogisticProbe
from kdgap.probes.splits import grouped_train_test_split
from kdgap.probes.stats import chance_level, cluster_bootstrap
from kdgap.probes.sweep import load_site

TRACKED = ("rationale_arm", "ucb_arm", "greedy_arm", "frequent_arm")


@dataclass
class KnowingDoingReport:
    """Result of :func:`knowing_doing`.

    Attributes:
        per_layer: one row per hook: hook, layer, knowing_acc and doing_acc (+_low/_high,
            on all test steps), knowing_chance, doing_chance, knowing_acc_dis and
            doing_acc_dis (+_low/_high, on the disagreement subset), knowing_as_action_dis,
            diff_dis (+_low/_high), chance_dis, agreement, tracks, diverges, n_test, n_dis.
        cosines: hook, layer, arm, cosine between knowing and doing directions.
        tracking: hook, layer, target, share (+low/high) on the disagreement subset.
        divergence_layer / divergence_hook: see the module docstring (None if none).
        dropped_classes: ``{label: {class: count}}`` left out under
            ``rare_classes="drop"`` (empty dicts otherwise).
    """

    per_layer: pd.DataFrame
    cosines: pd.DataFrame
    tracking: pd.DataFrame
    divergence_layer: int | None
    divergence_hook: str | None
    dropped_classes: dict[str, dict[int, int]] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for logs and READMEs."""
        last = self.per_layer.iloc[-1]
        return (
            f"last layer ({last['hook']}): knowing {last['knowing_acc']:.3f}, doing "
            f"{last['doing_acc']:.3f}, agreement {last['agreement']:.3f}; on the "
            f"disagreement subset (n={int(last['n_dis'])}) the doing probe tracks "
            f"{last['tracks']}; divergence layer: {self.divergence_layer}"
        )


def knowing_doing(
    store: ActivationSource,
    *,
    site: str = "action",
    hooks: Sequence[str] | None = None,
    knowing: str = "rationale_arm",
    doing: str = "action",
    trainer: str = "batched",
    Cs: Sequence[float] = DEFAULT_CS,
    cv: int = 4,
    test_size: float = 0.25,
    min_class_count: int = 10,
    rare_classes: str = "raise",
    n_boot: int = 1000,
    seed: int = 0,
) -> KnowingDoingReport:
    """Knowing vs doing probes per layer at ``site`` (see the module docstring).

    Args:
        store: any :class:`~kdgap.probes.dataset.ActivationSource`.
        hooks: hooks to compare (default: every ``hook_resid_post``, else every hook),
            put in residual-stream order.
        knowing, doing: label columns of the two probes.
        trainer: ``"batched"`` or ``"sklearn"`` (same probes, see :mod:`.batched`).
        Cs, cv, test_size, min_class_count, n_boot, seed: as :func:`.sweep.sweep`.
        rare_classes: as :func:`.sweep.sweep`; under ``"drop"`` a step whose knowing or
            doing label is a rare class is left out of the whole comparison (both probes
            see the same steps), and the report lists what was dropped.
    """
    if hooks is None:
        hooks = [h for h in store.hooks if h.endswith("hook_resid_post")] or list(store.hooks)
    hooks, _ = check_hooks_sites(store, residual_order(hooks), [site])
    check_labels(store.labels, [knowing, doing, *TRACKED])
    X, table = load_site(store, hooks, site)
    dropped = {}
    y_k, dropped[knowing] = handle_rare_classes(label_array(table, knowing), label=knowing,
                                                min_count=min_class_count,
                                                rare_classes=rare_classes)  # fmt: skip
    y_d, dropped[doing] = handle_rare_classes(label_array(table, doing), label=doing,
                                              min_count=min_class_count,
                                              rare_classes=rare_classes)  # fmt: skip
    keep = (y_k >= 0) & (y_d >= 0)
    if not keep.any():
        raise ValueError(f"no example has both {knowing!r} and {doing!r}; nothing to compare.")
    X, table, y_k, y_d = X[:, keep], table[keep].reset_index(drop=True), y_k[keep], y_d[keep]
    while rare_classes == "drop":
        # Steps dropped for one label can leave a class of the other below the minimum:
        # drop again until both labels are stable (each round removes a class, so it ends).
        y_k, more_k = handle_rare_classes(y_k, label=knowing, min_count=min_class_count,
                                          rare_classes="drop")  # fmt: skip
        y_d, more_d = handle_rare_classes(y_d, label=doing, min_count=min_class_count,
                                          rare_classes="drop")  # fmt: skip
        if not more_k and not more_d:
            break
        dropped[knowing] = {**dropped[knowing], **more_k}
        dropped[doing] = {**dropped[doing], **more_d}
        keep = (y_k >= 0) & (y_d >= 0)
        X, table, y_k, y_d = X[:, keep], table[keep].reset_index(drop=True), y_k[keep], y_d[keep]
    for lab, yy in ((knowing, y_k), (doing, y_d)):
        check_class_counts(yy, label=lab, min_count=min_class_count)
    groups = table["episode"].to_numpy()
    tr, te = grouped_train_test_split(groups, test_size=test_size, seed=seed)
    Y = np.stack([y_k, y_d])
    if trainer == "batched":
        fit = fit_logistic_batched(X[:, tr], Y[:, tr], groups[tr], Cs=Cs, cv=cv, seed=seed)
        pred = fit.predict(X[:, te])  # [L, 2, n_test]
        dirs = fit.directions().numpy()  # [L, 2, K, d]
        classes = fit.classes
    elif trainer == "sklearn":
        pred = np.zeros((len(hooks), 2, len(te)), dtype=np.int64)
        dirs, classes = [], None
        for h in range(len(hooks)):
            ps = [LogisticProbe(Cs=Cs, cv=cv, random_state=seed).fit(
                X[h, tr].numpy(), Y[t, tr], groups[tr]) for t in range(2)]  # fmt: skip
            pred[h] = [p.predict(X[h, te].numpy()) for p in ps]
            classes = [p.classes_ for p in ps]
            K = max(len(c) for c in classes)
            dirs.append([np.pad(p.directions_, ((0, K - len(p.classes_)), (0, 0))) for p in ps])
        dirs = np.asarray(dirs)
    else:
        raise ValueError(f"trainer={trainer!r}: use 'batched' or 'sklearn'.")

    g_te, yk_te, yd_te = groups[te], y_k[te], y_d[te]
    dis = yk_te != yd_te
    dis_tr = y_k[tr] != y_d[tr]
    if dis.any() and dis_tr.any():
        vals, counts = np.unique(y_d[tr][dis_tr], return_counts=True)
        chance_dis = float(np.mean(yd_te[dis] == vals[np.argmax(counts)]))
    else:
        chance_dis = float("nan")
    chance_k, chance_d = chance_level(y_k[tr], yk_te), chance_level(y_d[tr], yd_te)
    tracked = {t: label_array(table, t)[te] for t in TRACKED}
    boot = {"n_boot": n_boot, "seed": seed}
    layer_rows, cos_rows, track_rows = [], [], []
    for h, hook in enumerate(hooks):
        pk, pd_ = pred[h, 0], pred[h, 1]
        k_all = cluster_bootstrap(pk == yk_te, g_te, **boot)
        d_all = cluster_bootstrap(pd_ == yd_te, g_te, **boot)
        row = {"hook": hook, "layer": layer_of(hook),
               "knowing_acc": k_all.value, "knowing_acc_low": k_all.low,
               "knowing_acc_high": k_all.high, "doing_acc": d_all.value,
               "doing_acc_low": d_all.low, "doing_acc_high": d_all.high,
               "agreement": float(np.mean(pk == pd_)), "n_test": len(te),
               "n_dis": int(dis.sum()), "chance_dis": chance_dis,
               "knowing_chance": chance_k, "doing_chance": chance_d}  # fmt: skip
        if dis.sum() >= 2 and len(np.unique(g_te[dis])) >= 2:
            hit_d = (pd_[dis] == yd_te[dis]).astype(float)
            hit_k = (pk[dis] == yd_te[dis]).astype(float)
            d_dis = cluster_bootstrap(hit_d, g_te[dis], **boot)
            diff = cluster_bootstrap(hit_d - hit_k, g_te[dis], **boot)
            shares = {t: cluster_bootstrap(pd_[dis] == v[dis], g_te[dis], **boot)
                      for t, v in tracked.items()}  # fmt: skip
            k_dis = cluster_bootstrap(pk[dis] == yk_te[dis], g_te[dis], **boot)
            row.update(
                knowing_acc_dis=k_dis.value, knowing_acc_dis_low=k_dis.low,
                knowing_acc_dis_high=k_dis.high, doing_acc_dis=d_dis.value,
                doing_acc_dis_low=d_dis.low, doing_acc_dis_high=d_dis.high,
                knowing_as_action_dis=float(hit_k.mean()), diff_dis=diff.value,
                diff_dis_low=diff.low, diff_dis_high=diff.high,
                tracks=max(shares, key=lambda t: shares[t].value),
                diverges=bool(diff.low > 0 and d_dis.low > chance_dis),
            )  # fmt: skip
            for t, e in shares.items():
                track_rows.append({"hook": hook, "layer": layer_of(hook), "target": t,
                                   "share": e.value, "low": e.low, "high": e.high})  # fmt: skip
        else:
            row.update(tracks=None, diverges=False)
        layer_rows.append(row)
        ck, cd = classes[0], classes[1]
        for arm in np.intersect1d(ck, cd):
            a = dirs[h, 0, int(np.searchsorted(ck, arm))]
            b = dirs[h, 1, int(np.searchsorted(cd, arm))]
            cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
            cos_rows.append({"hook": hook, "layer": layer_of(hook), "arm": int(arm),
                             "cosine": cos})  # fmt: skip
    per_layer = pd.DataFrame(layer_rows)
    div = per_layer["diverges"].to_numpy(bool)
    first = None
    for i in range(len(div) - 1, -1, -1):  # walk back while every later layer diverges
        if not div[i]:
            break
        first = i
    return KnowingDoingReport(
        per_layer=per_layer, cosines=pd.DataFrame(cos_rows), tracking=pd.DataFrame(track_rows),
        divergence_layer=None if first is None else layer_of(hooks[first]),
        divergence_hook=None if first is None else hooks[first], dropped_classes=dropped,
    )  # fmt: skip
