"""Fit a probe for every (hook, layer, site, label) cell of an activation store in one call.

For each site, the examples are split once into train/test by episode (the same split for
every hook and label, so cells are comparable). Each label gets a Hewitt-Liang control task
(:mod:`kdgap.probes.control`), fitted by the same probe on the same split. With
``trainer="batched"`` all hooks and all labels (real and control) of a site are fitted in
one batched optimisation (:mod:`kdgap.probes.batched`); ``trainer="sklearn"`` loops
:class:`~kdgap.probes.estimators.LogisticProbe` over cells (the reference the batched
trainer is tested and benchmarked against).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Shaped

from kdgap.io import atomic_write as write_atomically
from kdgap.probes.batched import fit_logistic_batched
from kdgap.probes.control import DEFAULT_CONTROL, control_labels, control_types, selectivity
from kdgap.probes.dataset import (
    DEFAULT_LABELS,
    ActivationSource,
    check_hooks_sites,
    check_labels,
    format_dropped,
    handle_rare_classes,
    label_array,
    layer_of,
)
from kdgap.probes.estimators import DEFAULT_CS, DiffMeansProbe, LogisticProbe
from kdgap.probes.splits import grouped_train_test_split
from kdgap.probes.stats import accuracy_ci, chance_level

PROBES = ("logistic", "diffmeans")
TRAINERS = ("batched", "sklearn")


def _site_control_types(
    store: ActivationSource, table: pd.DataFrame, name: str
) -> Shaped[np.ndarray, " n_examples"]:
    """Control types of ``table``'s rows (one site), computed over *every* recorded step.

    A reward history must read the episode's rewards from all its steps, including steps
    this site lacks (skipped examples, ``history.last`` at step 0): their rewards are still
    in the prompt. So the types come from ``store.labels`` and are matched to the site's
    rows by (episode, step); other features are read from the site's rows directly.
    """
    full = getattr(store, "labels", None)
    keys = ["episode", "step"]
    if name != "reward_history" or full is None or len(full) == len(table):
        return control_types(table, name)
    if full.duplicated(keys).any():
        return control_types(table, name)  # (episode, step) does not identify a step
    types = full[keys].assign(_type=control_types(full, name))
    merged = table[keys].merge(types, on=keys, how="left", validate="many_to_one")
    return merged["_type"].to_numpy()


def load_site(
    store: ActivationSource, hooks: Sequence[str], site: str
) -> tuple[Float[torch.Tensor, "n_hooks n_examples d"], pd.DataFrame]:
    """Stack ``hooks`` at ``site``: ``(Float[Tensor, "n_hooks n_examples d"], labels)``.

    Extra activation dims (e.g. per-head ``z``) are flattened. All hooks must hold the
    same examples in the same order and have the same width, or this says which differ.
    """
    acts, table = [], None
    for hook in hooks:
        a, lab = store.load(hook=hook, site=site)
        a = torch.as_tensor(a).float().reshape(len(a), -1)
        if table is None:
            table = lab.reset_index(drop=True)
        elif len(lab) != len(table) or not np.array_equal(
            lab[["episode", "step"]].to_numpy(), table[["episode", "step"]].to_numpy()
        ):
            raise ValueError(
                f"hook={hook!r} at site={site!r} holds different examples than {hooks[0]!r}; "
                "sweep hooks recorded together (or pass hooks=... for one recording)."
            )
        if acts and a.shape[1] != acts[0].shape[1]:
            raise ValueError(
                f"hooks={list(hooks)!r} mix widths ({acts[0].shape[1]} vs {a.shape[1]} at "
                f"{hook!r}); sweep hooks of one width per call."
            )
        acts.append(a)
    return torch.stack(acts), table


def atomic_write(df: pd.DataFrame, out: str | os.PathLike) -> Path:
    """Write ``df`` to ``out`` (``.parquet`` or ``.csv``) atomically (temp file + rename)."""
    out = Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise ValueError(f"out={str(out)!r}: use a .parquet or .csv file name.")
    if out.suffix == ".parquet":
        return write_atomically(out, lambda tmp: df.to_parquet(tmp, index=False))
    return write_atomically(out, lambda tmp: df.to_csv(tmp, index=False))


def sweep(
    store: ActivationSource,
    *,
    labels: Sequence[str] = DEFAULT_LABELS,
    hooks: Sequence[str] | None = None,
    sites: Sequence[str] | None = None,
    probes: Sequence[str] = PROBES,
    trainer: str = "batched",
    Cs: Sequence[float] = DEFAULT_CS,
    cv: int = 4,
    test_size: float = 0.25,
    control_feature: str = DEFAULT_CONTROL,
    min_class_count: int = 10,
    rare_classes: str = "raise",
    n_boot: int = 1000,
    seed: int = 0,
    out: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Probe every (hook, site, label) cell of ``store``; return (and save) a tidy table.

    Args:
        store: any :class:`~kdgap.probes.dataset.ActivationSource`.
        labels: label-table columns to decode (rows where a label is NA are left out of
            that label's cells).
        hooks, sites: subsets to sweep (None = all recorded).
        probes: any of ``"logistic"``, ``"diffmeans"``.
        trainer: ``"batched"`` (one torch optimisation per site) or ``"sklearn"``.
        Cs, cv: regularisation grid and inner folds of the logistic probe.
        test_size: fraction of episodes held out.
        control_feature: surface feature of the control tasks: ``"reward_history"`` (the default;
            the episode's last rewards, see :mod:`kdgap.probes.control`) or a label-table
            column such as ``"step"``.
        min_class_count: every class needs this many examples (per label and site).
        rare_classes: what a rarer class does: ``"raise"`` (default) stops with an error
            naming it; ``"drop"`` leaves its examples out of that label's cells (fitted
            and scored on the other classes; see
            :func:`~kdgap.probes.dataset.handle_rare_classes`) and records it in the
            ``dropped_classes`` column. Use ``"drop"`` on real runs, where an arm the
            agent almost never picks would otherwise stop the sweep.
        n_boot: episode-bootstrap replicates for the intervals.
        seed: split, folds, control map and bootstrap seed.
        out: optional ``.parquet``/``.csv`` path, written atomically.

    Returns:
        One row per (hook, site, label, probe) with columns hook, layer, site, label,
        probe, accuracy, ci_low, ci_high, chance, control_accuracy, selectivity, C,
        n_classes, n_train, n_test, n_test_episodes, dropped_classes (``"class:count,..."``
        of classes left out under ``rare_classes="drop"``, else ``""``), n_dropped.
    """
    if trainer not in TRAINERS:
        raise ValueError(f"trainer={trainer!r}: use one of {TRAINERS}.")
    bad = [p for p in probes if p not in PROBES]
    if bad or not probes:
        raise ValueError(f"probes={list(probes)!r}: use a non-empty subset of {PROBES}.")
    hooks, sites = check_hooks_sites(store, hooks, sites)
    labels = check_labels(store.labels, labels)
    control_types(store.labels.head(0), control_feature)  # fail before any fitting
    rows = []
    for site in sites:
        X, table = load_site(store, hooks, site)
        groups = table["episode"].to_numpy()
        y, dropped = [], []
        for lab in labels:
            y_lab, drop = handle_rare_classes(label_array(table, lab), label=lab,
                                              min_count=min_class_count,
                                              rare_classes=rare_classes)  # fmt: skip
            y.append(y_lab)
            dropped.append(drop)
        y = np.stack(y)
        feature = _site_control_types(store, table, control_feature)
        y_ctl = np.stack([control_labels(feature, yl, seed=seed) for yl in y])
        tr, te = grouped_train_test_split(groups, test_size=test_size, seed=seed)
        tasks = np.concatenate([y, y_ctl])  # [2 * n_labels, n]: real tasks, then controls
        preds = {}
        if "logistic" in probes:
            preds["logistic"] = _logistic_preds(X, tasks, groups, tr, te, trainer, Cs, cv, seed)
        if "diffmeans" in probes:
            preds["diffmeans"] = _diffmeans_preds(X, tasks, tr, te)
        for probe, (pred, C) in preds.items():
            for j, lab in enumerate(labels):
                ok_tr, ok_te = y[j, tr] >= 0, y[j, te] >= 0
                te_rows = te[ok_te]
                for h, hook in enumerate(hooks):
                    acc = accuracy_ci(y[j, te_rows], pred[h, j, ok_te], groups[te_rows],
                                      n_boot=n_boot, seed=seed)  # fmt: skip
                    ctl = float(np.mean(pred[h, len(labels) + j, ok_te] == y_ctl[j, te_rows]))
                    rows.append({
                        "hook": hook, "layer": layer_of(hook), "site": site, "label": lab,
                        "probe": probe, "accuracy": acc.value, "ci_low": acc.low,
                        "ci_high": acc.high,
                        "chance": chance_level(y[j, tr][ok_tr], y[j, te_rows]),
                        "control_accuracy": ctl, "selectivity": selectivity(acc.value, ctl),
                        "C": float(C[h, j]) if C is not None else float("nan"),
                        "n_classes": len(np.unique(y[j, tr][ok_tr])),
                        "n_train": int(ok_tr.sum()), "n_test": int(ok_te.sum()),
                        "n_test_episodes": len(np.unique(groups[te_rows])),
                        "dropped_classes": format_dropped(dropped[j]),
                        "n_dropped": sum(dropped[j].values()),
                    })  # fmt: skip
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    if out is not None:
        atomic_write(df, out)
    return df


def _logistic_preds(X, tasks, groups, tr, te, trainer, Cs, cv, seed):
    """Test predictions ``[n_hooks, n_tasks, n_test]`` and chosen C ``[n_hooks, n_tasks]``."""
    n_hooks, n_tasks = X.shape[0], len(tasks)
    if trainer == "batched":
        fit = fit_logistic_batched(X[:, tr], tasks[:, tr], groups[tr], Cs=Cs, cv=cv, seed=seed)
        return fit.predict(X[:, te]), fit.C
    pred = np.full((n_hooks, n_tasks, len(te)), -1, dtype=np.int64)
    C = np.zeros((n_hooks, n_tasks))
    Xn = X.numpy()
    for h in range(n_hooks):
        for t in range(n_tasks):
            rows = tr[tasks[t, tr] >= 0]
            probe = LogisticProbe(Cs=Cs, cv=cv, random_state=seed)
            probe.fit(Xn[h, rows], tasks[t, rows], groups[rows])
            pred[h, t] = probe.predict(Xn[h, te])
            C[h, t] = probe.C_
    return pred, C


def _diffmeans_preds(X, tasks, tr, te):
    """Difference-of-means test predictions ``[n_hooks, n_tasks, n_test]`` (C = None)."""
    pred = np.full((X.shape[0], len(tasks), len(te)), -1, dtype=np.int64)
    Xn = X.numpy()
    for h in range(X.shape[0]):
        for t in range(len(tasks)):
            rows = tr[tasks[t, tr] >= 0]
            pred[h, t] = DiffMeansProbe().fit(Xn[h, rows], tasks[t, rows]).predict(Xn[h, te])
    return pred, None
