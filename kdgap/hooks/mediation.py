"""How much of an edit's effect on the action travels through attention to the senders.

For a set of counterfactual pairs (:mod:`kdgap.hooks.pairs`) and a sender span (the
rationale by default, the history for history edits), with noising path patching
(:func:`kdgap.hooks.path_patching.path_patch`, base = clean):

    total effect  TE = LD_corrupt - LD_clean
    path effect   PE = LD(clean run, receiver reads corrupt senders at every layer) - LD_clean
    mediated fraction = mean(PE) / mean(TE)                      (ratio of means)
    layer profile[l]  = mean(PE_l) / mean(TE)  (path patched at layer l only)

Ratios of means are used rather than means of per-pair ratios, which explode for pairs
whose edit barely moves the action. Confidence intervals are percentile bootstraps over
pairs (pairs resampled with replacement, both means recomputed each time).

A faithful organism (action reads the rationale's conclusion) should give a fraction near
1 for conclusion edits; a greedy-bypass organism near 0, with history edits mediated by
the history span instead. The ground-truth test is::

    pairs = [make_pair("conclusion", fmt, cfg, a, r, c) for a, r, c in steps]
    res = mediation(model, pairs, tokenizer, fmt)
    assert res.fraction >= 0.8
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float

from kdgap.hooks.pairs import CounterfactualPair, tokenize_pairs
from kdgap.hooks.path_patching import path_patch

SENDERS = ("rationale", "history")


@dataclass
class MediationResult:
    """Mediated fraction with bootstrap CIs, and the per-layer profile.

    Attributes:
        fraction: mean(PE) / mean(TE) over pairs.
        fraction_ci: ``(low, high)`` percentile bootstrap interval.
        layer_fraction: ``[layer]`` mean(PE_l) / mean(TE).
        layer_ci: ``[layer 2]`` bootstrap intervals of ``layer_fraction``.
        total_effect: ``[pair]`` TE per pair (input order).
        path_effect: ``[pair]`` PE per pair.
        layer_effect: ``[pair layer]`` PE_l per pair.
        senders: which span was the sender set.
    """

    fraction: float
    fraction_ci: tuple[float, float]
    layer_fraction: Float[np.ndarray, " layer"]
    layer_ci: Float[np.ndarray, "layer 2"]
    total_effect: Float[np.ndarray, " pair"]
    path_effect: Float[np.ndarray, " pair"]
    layer_effect: Float[np.ndarray, "pair layer"]
    senders: str

    def summary(self) -> str:
        """One line: fraction, CI and the peak layer of the profile."""
        lo, hi = self.fraction_ci
        peak = int(np.argmax(np.abs(self.layer_fraction)))
        return (
            f"mediated by {self.senders}: {self.fraction:.3f} [{lo:.3f}, {hi:.3f}] over "
            f"{len(self.total_effect)} pairs; layer profile "
            f"{np.round(self.layer_fraction, 3).tolist()} (peak layer {peak})"
        )


def ratio_ci(
    num: Float[np.ndarray, "pair ..."],
    den: Float[np.ndarray, " pair"],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[Float[np.ndarray, "..."], Float[np.ndarray, "... 2"]]:
    """``mean(num) / mean(den)`` and its percentile bootstrap interval over pairs.

    Raises:
        ZeroDivisionError: ``mean(den)`` is 0 (the edits have no total effect).
    """
    num, den = np.asarray(num, float), np.asarray(den, float)
    if abs(den.mean()) < 1e-12:
        raise ZeroDivisionError(
            "the mean total effect is 0: the edits do not move the action's logit "
            "difference, so no fraction of it can be mediated; check the pairs' arms."
        )
    point = num.mean(0) / den.mean()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(den), size=(n_boot, len(den)))
    d = den[idx].mean(1)
    d = np.where(np.abs(d) < 1e-12, np.nan, d)
    boots = num[idx].mean(1) / d.reshape(-1, *([1] * (num.ndim - 1)))
    alpha = (1 - level) / 2
    ci = np.nanquantile(boots, [alpha, 1 - alpha], axis=0)
    return point, np.moveaxis(ci, 0, -1)


def mediation(
    model,
    pairs: Sequence[CounterfactualPair],
    tokenizer,
    fmt,
    *,
    senders: str = "rationale",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    prepend_bos: bool = True,
    **path_kwargs,
) -> MediationResult:
    """Fraction of each edit's effect on the action mediated by attention to ``senders``.

    Args:
        model: a TransformerBridge in eval mode.
        pairs: counterfactual pairs (any kinds; pairs of different lengths are grouped).
        tokenizer: the model's fast tokenizer.
        fmt: the transcript format the pairs were built with (arm tokens).
        senders: ``"rationale"`` or ``"history"``: the span whose route to the action
            position is patched.
        n_boot, level, seed: bootstrap settings.
        path_kwargs: passed to :func:`~kdgap.hooks.path_patching.path_patch`
            (``memory_mb``, ``max_rows``).

    Returns:
        :class:`MediationResult`.
    """
    if senders not in SENDERS:
        raise ValueError(f"senders={senders!r} is unknown; use one of {SENDERS}.")
    if not pairs:
        raise ValueError("pairs is empty; build some with kdgap.hooks.pairs.make_pair.")
    n = len(pairs)
    n_layers = int(model.cfg.n_layers)
    te, pe, le = np.zeros(n), np.zeros(n), np.zeros((n, n_layers))
    for group in tokenize_pairs(pairs, tokenizer, fmt, prepend_bos=prepend_bos):
        res = path_patch(
            model, group.clean_tokens, group.corrupt_tokens, group.metric,
            getattr(group, senders), direction="noise", **path_kwargs,
        )  # fmt: skip
        te[group.index] = res.total_effect.numpy()
        pe[group.index] = res.path_effect.numpy()
        le[group.index] = res.layer_effect.numpy()
    frac, frac_ci = ratio_ci(pe, te, n_boot=n_boot, level=level, seed=seed)
    lf, lci = ratio_ci(le, te, n_boot=n_boot, level=level, seed=seed)
    return MediationResult(
        float(frac), (float(frac_ci[0]), float(frac_ci[1])), lf, lci, te, pe, le, senders
    )
