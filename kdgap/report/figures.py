"""The report's figures, each a function from saved results (plain dicts) to PNG + PDF.

Every function takes the data exactly as stored in ``summary.json`` (plain JSON values,
see ``docs/summary-schema.md``), so ``kdgap figures DIR`` re-renders them without running
a model. Each returns the paths it wrote. Captions live in :data:`CAPTIONS` so the report
and the notebooks share them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from kdgap.metrics.knowing_doing import ACTION_CLASSES, PAPER_KD_MATRIX
from kdgap.report.style import paper_style, save, series

CAPTIONS = {
    "probes": "Linear-probe accuracy at the action site by layer. Knowing: decoding the "
    "rationale's arm; doing: decoding the action. Solid: all steps; dashed: the disagreement "
    "subset (rationale arm differs from the action). Bands: 95% confidence intervals; dotted "
    "line: chance (majority class); vertical line: the divergence layer.",
    "patching": "Noising patch of the residual stream (resid_pre) by layer and position for "
    "one conclusion edit (the rationale's concluding arm replaced by another arm). LD is the "
    "logit difference between the clean action and the edited arm at the action position; "
    "cells show (LD_clean - LD_patched) / (2 LD_clean): 1 = the action fully follows the "
    "edited conclusion, 0 = no change.",
    "mediation": "Share of a full flip toward the edited conclusion carried by the action "
    "position's attention to the rationale tokens (path patching of keys and values seen "
    "by the action position only), one layer at a time, with 95% bootstrap intervals over "
    "pairs; the title gives all layers together.",
    "indirect": "Where the mediation decomposition's effects enter the action, layer by "
    "layer (path patching of the keys and values the action position reads; shares of a "
    "full flip with 95% bootstrap intervals over episodes). Left: the indirect effect, the "
    "history held and the rationale replaced by the one written under an edited history: "
    "the layers at which the action reads it (flat near 0 when it does not). Right, where "
    "the history's direct effect moves the action: an edited history, the rationale text "
    "held, read through the rationale positions (hatched) or directly at the history "
    "positions (white).",
    "overlay": "The models' layer profiles overlaid (each model against the first: e.g. "
    "before and after fine-tuning). Left: the indirect effect read at the action position, "
    "layer by layer (the rationale written under an edited history, the history held). "
    "Right: conclusion edits, the share of a full flip carried by the action position's "
    "attention to the rationale, layer by layer. Bands: 95% bootstrap intervals.",
    "kd_matrix": "Knowing-doing matrix: share of all steps by rationale correctness and action "
    "class (optimal wins ties with greedy). The seed paper's Gemma2 27B values are shown in "
    "brackets.",
    "behavior": "Action coverage (share of arms tried) and cumulative regret by step, "
    "against the UCB and random baselines on the same bandits.",
    "freqbias": "Frequency-bias protocol: probability mass on the most frequent, the greedy "
    "and other arms, and the entropy of the action distribution, against the number of "
    "repetitions of the last action.",
}


def probe_layers(data: Mapping, stem: str | Path, *, title: str = "") -> list[Path]:
    """Knowing vs doing probe accuracy by layer.

    Args:
        data: ``{"layers": [L], "knowing_acc": [L], "knowing_ci": [L][2], "doing_acc",
            "doing_ci", "knowing_acc_disagree", "knowing_ci_disagree", "doing_acc_disagree",
            "doing_ci_disagree", "chance": float, "divergence_layer": int | None}``;
            disagreement entries may be None (no disagreement steps); ``chance`` may also
            be a dict per probe (``{"knowing", "doing", ...}``).
        stem: output path without suffix.
    """
    layers = np.asarray(data["layers"])
    with paper_style():
        fig, ax = plt.subplots(figsize=(4.2, 2.8))
        curves = [
            ("knowing (all steps)", "knowing_acc", "knowing_ci", 0, "-"),
            ("doing (all steps)", "doing_acc", "doing_ci", 1, "-"),
            ("knowing (disagreement)", "knowing_acc_disagree", "knowing_ci_disagree", 0, "--"),
            ("doing (disagreement)", "doing_acc_disagree", "doing_ci_disagree", 1, "--"),
        ]
        for label, key, ci_key, s, ls in curves:
            acc = data.get(key)
            if acc is None or all(a is None for a in acc):
                continue
            acc = np.array([np.nan if a is None else a for a in acc], dtype=float)
            style = series(s) | {"linestyle": ls}
            if ls == "--":
                style["marker"] = "x" if s == 0 else "+"
            ax.plot(layers, acc, label=label, **style)
            ci = data.get(ci_key)
            if ci is not None:
                ci = np.array([[np.nan, np.nan] if c is None else c for c in ci], dtype=float)
                ax.fill_between(layers, ci[:, 0], ci[:, 1], color=style["color"], alpha=0.15)
        chance = data["chance"]
        if isinstance(chance, Mapping):  # per probe: draw the all-steps chance of "doing"
            chance = chance.get("doing", chance.get("knowing"))
        if chance is not None:
            ax.axhline(chance, color="0.4", linestyle=":", linewidth=1, label="chance")
        if data.get("divergence_layer") is not None:
            ax.axvline(data["divergence_layer"], color="0.2", linewidth=1, linestyle="-.",
                       label=f"divergence layer {data['divergence_layer']}")  # fmt: skip
        ax.set_xlabel("layer (residual stream after block)")
        ax.set_ylabel("probe accuracy")
        ax.set_xticks(layers)
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=6.5)
        return save(fig, stem)


#: Most token labels on a heatmap's axis (every k-th token is labelled above it).
MAX_TOKEN_LABELS = 120


def patching_heatmap(
    values: Sequence[Sequence[float]], tokens: Sequence[str], stem: str | Path, *, title: str = ""
) -> list[Path]:
    """Layer x position heatmap of a normalised patching effect, tokens as tick labels (every
    k-th token on prompts longer than :data:`MAX_TOKEN_LABELS`).

    Args:
        values: ``[layers, pos]`` normalised effect.
        tokens: ``[pos]`` token strings.
    """
    v = np.asarray(values, dtype=float)
    if v.shape[1] != len(tokens):
        raise ValueError(f"values has {v.shape[1]} positions but tokens has {len(tokens)}.")
    with paper_style():
        width = min(max(4.0, 0.16 * len(tokens)), 14.0)
        fig, ax = plt.subplots(figsize=(width, 0.45 * v.shape[0] + 1.4))
        # A grey colormap keeps the figure readable in greyscale; the range is fixed.
        im = ax.imshow(v, aspect="auto", cmap="Greys", vmin=min(0.0, v.min()),
                       vmax=max(1.0, v.max()), interpolation="nearest")  # fmt: skip
        ax.set_yticks(range(v.shape[0]))
        ax.set_ylabel("layer")
        # At most MAX_TOKEN_LABELS labels: beyond that the 14-inch axis cannot show them
        # apart (and drawing hundreds of rotated labels dominates the report's time).
        step = -(-len(tokens) // MAX_TOKEN_LABELS)
        ax.set_xticks(range(0, len(tokens), step))
        ax.set_xticklabels(list(tokens)[::step], rotation=90, fontsize=5)
        ax.set_xlabel("position (token)")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label="normalised logit difference", fraction=0.03)
        return save(fig, stem)


def mediation_profile(data: Mapping, stem: str | Path, *, title: str = "") -> list[Path]:
    """Mediated share per layer with bootstrap intervals.

    Args:
        data: ``{"layers": [L], "layer_profile": [L], "layer_profile_ci": [L][2],
            "mediated_fraction": float, "mediated_fraction_ci": [2]}``.
    """
    layers = np.asarray(data["layers"])
    prof = np.asarray(data["layer_profile"], dtype=float)
    ci = np.asarray(data["layer_profile_ci"], dtype=float)
    with paper_style():
        fig, ax = plt.subplots(figsize=(3.6, 2.6))
        ax.bar(layers, prof, color="0.55", edgecolor="black", hatch="//", width=0.6)
        # A percentile bootstrap interval need not contain the point estimate: clip at 0.
        yerr = np.clip([prof - ci[:, 0], ci[:, 1] - prof], 0, None)
        ax.errorbar(layers, prof, yerr=yerr, fmt="none", ecolor="black", capsize=3)
        lo, hi = data["mediated_fraction_ci"]
        ax.set_title(
            f"{title}\ntotal mediated: {data['mediated_fraction']:.2f} [{lo:.2f}, {hi:.2f}]"
        )
        ax.set_xlabel("layer")
        ax.set_ylabel("share of effect via rationale")
        ax.set_xticks(layers)
        ax.axhline(0, color="black", linewidth=0.8)
        return save(fig, stem)


def indirect_profile(data: Mapping, stem: str | Path, *, title: str = "") -> list[Path]:
    """Per layer, where the rationale reaches the action (the indirect effect's layer
    profile) and, where the history's direct effect moves the action, that effect through
    the rationale positions vs the action's own reads of the history; with intervals.

    Args:
        data: the summary's ``decomposition.activation``: ``layers``, ``read_layer_profile``
            (+ ``_ci``), ``read_fraction`` (+ ``_ci``), ``layer_profile`` (+ ``_ci``),
            ``direct_layer_profile`` (+ ``_ci``), ``indirect_share`` (+ ``_ci``); a panel
            whose profile is None is left out.
    """
    layers = np.asarray(data["layers"])
    panels = [
        p
        for p in ("read", "split")
        if data.get("read_layer_profile" if p == "read" else "layer_profile") is not None
    ]
    if not panels:
        raise ValueError("data has neither read_layer_profile nor layer_profile to plot.")
    with paper_style():
        fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 2.6), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            if panel == "read":
                series = (("read_layer_profile", "rationale -> action", "", 0.0, 0.6),)
                share, ci, name = (data.get("read_fraction"), data.get("read_fraction_ci"),
                                   "indirect effect read, all layers")  # fmt: skip
                ax.set_ylabel("share of a full flip")
            else:
                series = (
                    ("layer_profile", "via rationale", "//", -0.18, 0.36),
                    ("direct_layer_profile", "direct (history)", "", 0.18, 0.36),
                )
                share, ci, name = (data.get("indirect_share"), data.get("indirect_share_ci"),
                                   "history edit: indirect share")  # fmt: skip
            for key, label, hatch, dx, width in series:
                prof = np.asarray(data[key], dtype=float)
                band = np.asarray(data[f"{key}_ci"], dtype=float)
                face = "white" if label.startswith("direct") else "0.55"
                ax.bar(layers + dx, prof, width=width, color=face, edgecolor="black",
                       hatch=hatch, label=label)  # fmt: skip
                yerr = np.clip([prof - band[:, 0], band[:, 1] - prof], 0, None)
                ax.errorbar(layers + dx, prof, yerr=yerr, fmt="none", ecolor="black", capsize=2)
            sub = f"{name}: n/a" if share is None else (
                f"{name}: {share:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
            )  # fmt: skip
            ax.set_title(f"{title}\n{sub}")
            ax.set_xlabel("layer")
            ax.set_xticks(layers)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.legend(frameon=False, fontsize=7)
        return save(fig, stem)


def kd_matrix(matrix: Mapping, stem: str | Path, *, title: str = "") -> list[Path]:
    """The knowing-doing matrix as a 2 x 3 table of shares, the paper's values bracketed."""
    rows = ("correct", "incorrect")
    v = np.array([[matrix[r][c] for c in ACTION_CLASSES] for r in rows])
    with paper_style():
        fig, ax = plt.subplots(figsize=(3.4, 1.9))
        ax.imshow(v, cmap="Greys", vmin=0, vmax=1)
        for i, r in enumerate(rows):
            for j, c in enumerate(ACTION_CLASSES):
                colour = "white" if v[i, j] > 0.5 else "black"
                ax.text(j, i, f"{100 * v[i, j]:.1f}%\n({100 * PAPER_KD_MATRIX[r][c]:.1f}%)",
                        ha="center", va="center", color=colour, fontsize=7)  # fmt: skip
        ax.set_xticks(range(3))
        ax.set_xticklabels(ACTION_CLASSES)
        ax.set_yticks(range(2))
        ax.set_yticklabels(list(rows))
        ax.set_ylabel("rationale")
        ax.set_xlabel("action")
        ax.set_title(title)
        return save(fig, stem)


def behavior_curves(
    curves: Mapping[str, Mapping], stem: str | Path, *, title: str = ""
) -> list[Path]:
    """Coverage and cumulative regret by step for several policies.

    Args:
        curves: ``{policy_name: {"coverage_curve": [T], "regret_curve": [T]}}``.
    """
    with paper_style():
        fig, axes = plt.subplots(1, 2, figsize=(6.4, 2.5))
        for i, (name, c) in enumerate(curves.items()):
            steps = np.arange(1, len(c["coverage_curve"]) + 1)
            style = series(i) | {"markevery": max(1, len(steps) // 8)}
            axes[0].plot(steps, c["coverage_curve"], label=name, **style)
            axes[1].plot(steps, c["regret_curve"], label=name, **style)
        axes[0].set_ylabel("action coverage $C_t$")
        axes[0].set_ylim(0, 1.02)
        axes[1].set_ylabel("cumulative regret")
        for ax in axes:
            ax.set_xlabel("step t")
        axes[1].legend(frameon=False)
        fig.suptitle(title)
        return save(fig, stem)


def frequency_bias(
    curves: Mapping[str, Mapping], stem: str | Path, *, title: str = ""
) -> list[Path]:
    """F_f / F_g / F_o and entropy against repetitions, one line style per class.

    Args:
        curves: ``{model: {"repetitions": [R], "F_f_curve", "F_g_curve", "F_o_curve",
            "entropy": [R]}}``.
    """
    with paper_style():
        fig, axes = plt.subplots(1, 2, figsize=(6.4, 2.5))
        for i, (name, c) in enumerate(curves.items()):
            reps = c["repetitions"]
            for j, key in enumerate(("F_f_curve", "F_g_curve", "F_o_curve")):
                style = series(j) | {"color": series(i)["color"]}
                axes[0].plot(reps, c[key], label=f"{name}: {key[:3]}", **style)
            axes[1].plot(reps, c["entropy"], label=name, **series(i))
        axes[0].set_ylabel("share of probability mass")
        axes[0].set_ylim(0, 1.02)
        axes[1].set_ylabel("entropy of action distribution (nats)")
        for ax in axes:
            ax.set_xlabel("repetitions of the last action")
        axes[0].legend(frameon=False, fontsize=6)
        axes[1].legend(frameon=False, fontsize=6)
        fig.suptitle(title)
        return save(fig, stem)


#: Panels of :func:`profile_overlay`: (summary path of a model's block, profile key, y label).
OVERLAY_PANELS = (
    ("decomposition.activation", "read_layer_profile", "indirect effect read (share of a flip)"),
    ("patching", "layer_profile", "conclusion edit via rationale (share of a flip)"),
)


def overlay_panels(blocks: Mapping[str, Sequence[Mapping | None]]) -> list[int]:
    """Indices of the :data:`OVERLAY_PANELS` some model of ``blocks`` has a profile for."""
    return [i for i, (_, key, _) in enumerate(OVERLAY_PANELS)
            if any(b[i] and b[i].get(key) is not None for b in blocks.values())]  # fmt: skip


def profile_overlay(
    blocks: Mapping[str, Sequence[Mapping | None]], stem: str | Path, *, title: str = ""
) -> list[Path]:
    """The layer profiles of several models on shared axes, one panel per
    :data:`OVERLAY_PANELS` entry that some model has.

    Args:
        blocks: ``{model: [the model's block for each panel, or None]}``; a block holds
            ``layers``, the profile and ``<profile>_ci``.
    """
    panels = overlay_panels(blocks)
    if not panels:
        raise ValueError("blocks hold no layer profile to overlay.")
    with paper_style():
        fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 2.6), squeeze=False)
        for ax, i in zip(axes[0], panels):
            _, key, ylabel = OVERLAY_PANELS[i]
            for j, (name, b) in enumerate(blocks.items()):
                block = b[i]
                if not block or block.get(key) is None:
                    continue
                layers = np.asarray(block["layers"])
                prof = np.asarray(block[key], dtype=float)
                band = np.asarray(block[f"{key}_ci"], dtype=float)
                style = series(j)
                ax.plot(layers, prof, label=name, **style)
                ax.fill_between(layers, band[:, 0], band[:, 1], color=style["color"], alpha=0.15)
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
            ax.set_ylabel(ylabel)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.legend(frameon=False, fontsize=6)
        fig.suptitle(title)
        return save(fig, stem)
