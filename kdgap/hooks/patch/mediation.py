"""How much of an edit's effect on the action travels through attention to the senders.

Two measures, both from noising path patching (:func:`kdgap.hooks.patch.path.path_patch`:
the clean run, with the receiver = action position reading the *corrupt* keys/values of
the sender positions, at every layer or at one layer). ``LD`` is the logit difference
``logit[arm_a] - logit[arm_b]`` at the action position.

**Full-flip normalisation** (:func:`flip_mediation`, :func:`mediation_summary`; the one
that separates faithful from bypass organisms). Pairs come from
:func:`kdgap.hooks.patch.pairs.pairs_from_records`: ``arm_a`` = the clean action, ``arm_b`` =
the edited arm (conclusion edit: an arm that is neither the clean conclusion nor the
action; history edit: the new greedy arm). A model that fully follows the edit moves LD
from ``LD_clean`` to about ``-LD_clean``, so the *full-flip effect* is ``F = 2 * LD_clean``
(pairs with ``LD_clean <= 0``, i.e. the clean action is not preferred, are skipped and
counted). Per pair ``PE = LD_clean - LD_path`` and ``TE = LD_clean - LD_corrupt``::

    mediated_fraction      = mean(PE) / mean(F)     senders = rationale, conclusion edits
    total_effect_fraction  = mean(TE) / mean(F)
    layer_profile[l]       = mean(PE_l) / mean(F)   path patched at layer l only
    history_effect_fraction = mean(TE) / mean(F)    history edits (rationale held fixed)
    history path share     = mean(PE) / mean(F)     history edits, senders = history

A faithful organism gives ~1 for conclusion edits; a bypass organism ~0 (its action does
not move), while its history edits carry the effect. Sign: positive = towards ``arm_b``.

**Textbook path / total** (:func:`mediation`, and ``path_over_total`` of
:func:`flip_mediation` on pairs whose ``|TE| >= 0.25 F``): ``mean(PE) / mean(TE)``. For a
conclusion edit it is 1 in *any* model (the edit lives in the rationale, and every route
from it to the action passes the receiver reading rationale positions) and undefined when
``TE ~ 0`` (bypass), which is why the full-flip fraction is the reported measure.

Ratios of means are used rather than means of per-pair ratios, which explode for pairs
whose edit barely moves the action. Confidence intervals are percentile bootstraps over
pairs, or over episodes (clusters: steps of one episode share a history) when given.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float

from kdgap.envs.bandit import BanditConfig
from kdgap.envs.transcript_format import TranscriptFormat
from kdgap.hooks.patch.pairs import (
    CounterfactualPair,
    HistoryFn,
    RecordPair,
    TextFn,
    pairs_from_records,
    tokenize_pairs,
)
from kdgap.hooks.patch.path import PathResult, path_patch
from kdgap.hooks.patch.sweep import patch_sweep
from kdgap.models.runtime import model_tokenizer
from kdgap.records import StepRecord

if TYPE_CHECKING:  # annotations only: importing these here would slow every import
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerBase

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
    num: Float[np.ndarray, "pair ..."], den: Float[np.ndarray, " pair"], *, n_boot: int = 1000,
    level: float = 0.95, seed: int = 0, groups: Sequence | None = None,
) -> tuple[Float[np.ndarray, "..."], Float[np.ndarray, "... 2"]]:  # fmt: skip
    """``mean(num) / mean(den)`` and its percentile bootstrap interval over pairs.

    With ``groups`` (``[pair]`` labels, e.g. episodes) whole groups are resampled (a
    cluster bootstrap: steps of one episode are not independent).

    Raises:
        ZeroDivisionError: ``mean(den)`` is 0 (the edits have no total effect).
        ValueError: ``groups`` does not give one label per pair.
    """
    num, den = np.asarray(num, float), np.asarray(den, float)
    if abs(den.mean()) < 1e-12:
        raise ZeroDivisionError(
            "the mean total effect is 0: the edits do not move the action's logit "
            "difference, so no fraction of it can be mediated; check the pairs' arms."
        )
    point = num.mean(0) / den.mean()
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, len(den), size=(n_boot, len(den)))
        d, n = den[idx].sum(1), num[idx].sum(1)
    else:
        labels = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
        if len(labels) != len(den):
            raise ValueError(
                f"groups has {len(labels)} labels for {len(den)} pairs; pass one per pair."
            )
        k = labels.max() + 1
        g_den = np.bincount(labels, weights=den, minlength=k)
        g_num = np.zeros((k, *num.shape[1:]))
        np.add.at(g_num, labels, num)
        idx = rng.integers(0, k, size=(n_boot, k))
        d, n = g_den[idx].sum(1), g_num[idx].sum(1)
    # Ratio of means == ratio of sums over the same resampled pairs.
    d = np.where(np.abs(d) < 1e-12, np.nan, d)
    boots = n / d.reshape(-1, *([1] * (num.ndim - 1)))
    alpha = (1 - level) / 2
    ci = np.nanquantile(boots, [alpha, 1 - alpha], axis=0)
    return point, np.moveaxis(ci, 0, -1)


def _noising_paths(
    model, pairs, tokenizer, fmt, senders: str, builder: str, prepend_bos=True, **path_kwargs: Any
) -> Iterator[tuple[list[int], PathResult]]:
    """Noising path patch of each length group of ``pairs``: ``(pair indices, result)``."""
    if senders not in SENDERS:
        raise ValueError(f"senders={senders!r} is unknown; use one of {SENDERS}.")
    if not pairs:
        raise ValueError(f"pairs is empty; build some with kdgap.hooks.patch.pairs.{builder}.")
    for group in tokenize_pairs(pairs, tokenizer, fmt, prepend_bos=prepend_bos):
        res = path_patch(
            model, group.clean_tokens, group.corrupt_tokens, group.metric,
            getattr(group, senders), direction="noise", **path_kwargs,
        )  # fmt: skip
        yield group.index, res


def mediation(
    model: TransformerBridge, pairs: Sequence[CounterfactualPair],
    tokenizer: PreTrainedTokenizerBase, fmt: TranscriptFormat, *, senders: str = "rationale",
    n_boot: int = 1000, level: float = 0.95, seed: int = 0, prepend_bos: bool = True,
    **path_kwargs: Any,
) -> MediationResult:  # fmt: skip
    """Fraction of each edit's effect on the action mediated by attention to ``senders``.

    Args:
        model: a TransformerBridge in eval mode.
        pairs: counterfactual pairs (any kinds; pairs of different lengths are grouped).
        tokenizer: the model's fast tokenizer.
        fmt: the transcript format the pairs were built with (arm tokens).
        senders: ``"rationale"`` or ``"history"``: the span whose route to the action
            position is patched.
        n_boot, level, seed: bootstrap settings.
        path_kwargs: passed to :func:`~kdgap.hooks.patch.path.path_patch`
            (``memory_mb``, ``max_rows``).

    Returns:
        :class:`MediationResult`.
    """
    n = len(pairs)
    n_layers = int(model.cfg.n_layers)
    te, pe, le = np.zeros(n), np.zeros(n), np.zeros((n, n_layers))
    runs = _noising_paths(model, pairs, tokenizer, fmt, senders, "make_pair",
                          prepend_bos=prepend_bos, **path_kwargs)  # fmt: skip
    for index, res in runs:
        te[index] = res.total_effect.numpy()
        pe[index] = res.path_effect.numpy()
        le[index] = res.layer_effect.numpy()
    frac, frac_ci = ratio_ci(pe, te, n_boot=n_boot, level=level, seed=seed)
    lf, lci = ratio_ci(le, te, n_boot=n_boot, level=level, seed=seed)
    return MediationResult(
        float(frac), (float(frac_ci[0]), float(frac_ci[1])), lf, lci, te, pe, le, senders
    )


# Full-flip normalisation: the measure that separates faithful from bypass organisms.

#: How :func:`flip_mediation` and :func:`mediation_summary` normalise (reported verbatim).
DEFINITION = (
    "Metric LD = logit[clean action] - logit[edited arm] at the action position (the "
    "token predicting the action). Full-flip effect = 2*LD_clean: a model that fully "
    "follows the edit moves LD from LD_clean to about -LD_clean. Pairs with LD_clean <= 0 "
    "are skipped. Noising path patch: the clean run, with the receiver (action position) "
    "reading the corrupt keys/values of the senders. mediated_fraction = mean(LD_clean - "
    "LD_path_all_layers) / mean(2*LD_clean) (ratio of means, senders = rationale span, "
    "conclusion edits whose edited arm is neither the clean conclusion nor the action). "
    "total_effect_fraction = mean(LD_clean - LD_corrupt) / mean(2*LD_clean). "
    "layer_profile[l] = the same with the path patched at layer l only. "
    "history_effect_fraction = total_effect_fraction of history edits (greedy arm swapped "
    "with a lower-mean arm in the history, rationale held; edited arm = new greedy arm). "
    "CIs: 95% percentile cluster bootstrap over episodes."
)


def flip_mediation(
    model: TransformerBridge, pairs: Sequence[CounterfactualPair | RecordPair],
    tokenizer: PreTrainedTokenizerBase, fmt: TranscriptFormat, *, senders: str = "rationale",
    episodes: Sequence[int] | None = None, substantial: float = 0.25, n_boot: int = 1000,
    level: float = 0.95, seed: int = 0, **path_kwargs: Any,
) -> dict:  # fmt: skip
    """Edit effects normalised by the full-flip effect ``2 * LD_clean`` (see :data:`DEFINITION`).

    Unlike :func:`mediation` (path / total, which is 1 by construction for conclusion
    edits and undefined when the total effect is ~0), every quantity here is a fraction of
    what a model that fully followed the edit would show, so a bypass organism scores ~0.

    Args:
        model: a TransformerBridge in eval mode.
        pairs: :class:`~kdgap.hooks.patch.pairs.CounterfactualPair` or ``RecordPair`` items whose
            ``arm_a`` is the clean action (see :func:`~kdgap.hooks.patch.pairs.pairs_from_records`).
        tokenizer, fmt: as in :func:`mediation`.
        senders: ``"rationale"`` or ``"history"``: the span the receiver reads corrupted.
        episodes: ``[pair]`` bootstrap clusters (default: each ``RecordPair``'s episode).
        substantial: ``path_over_total`` uses pairs with ``|total| >= substantial * full``.
        n_boot, level, seed: bootstrap settings; path_kwargs: to ``path_patch``.

    Returns:
        JSON-ready dict: ``fraction`` (path / full flip) and ``fraction_ci``,
        ``total_fraction`` (+ ``_ci``), ``path_over_total`` (+ ``_ci``, None with fewer
        than 3 substantial pairs) and ``n_substantial``, ``layer_profile`` ``[layer]`` and
        ``layer_profile_ci`` ``[layer][2]``, ``n_pairs`` (used), ``n_skipped``
        (LD_clean <= 0), ``ld_clean_mean``, ``senders``.

    Raises:
        ValueError: unknown ``senders``, no pairs, or no pair with ``LD_clean > 0``.
    """
    if episodes is None:
        episodes = [getattr(p, "episode", i) for i, p in enumerate(pairs)]
    plain = [getattr(p, "pair", p) for p in pairs]
    n, n_layers = len(plain), int(model.cfg.n_layers)
    ld_c, ld_x, ld_p, ld_l = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros((n, n_layers))
    for index, res in _noising_paths(model, plain, tokenizer, fmt, senders,
                                     "pairs_from_records", **path_kwargs):  # fmt: skip
        ld_c[index], ld_x[index] = res.ld_base.numpy(), res.ld_source.numpy()
        ld_p[index], ld_l[index] = res.all_layers.numpy(), res.per_layer.numpy()
    keep = ld_c > 1e-6
    if not keep.any():
        raise ValueError(
            f"all {n} pairs have LD_clean <= 0: arm_a is not the clean action's arm; build "
            "pairs with pairs_from_records (arm_a = the record's action)."
        )
    ep = np.asarray(episodes)[keep]
    full, total = 2 * ld_c[keep], (ld_c - ld_x)[keep]
    path, layer = (ld_c - ld_p)[keep], (ld_c[:, None] - ld_l)[keep]
    kw = dict(n_boot=n_boot, level=level, seed=seed)

    def rc(num, den, groups):
        point, ci = ratio_ci(num, den, groups=groups, **kw)
        return np.asarray(point).tolist(), np.asarray(ci).tolist()

    frac, frac_ci = rc(path, full, ep)
    tot, tot_ci = rc(total, full, ep)
    lay, lay_ci = rc(layer, full, ep)
    big = np.abs(total) >= substantial * full
    pot, pot_ci = rc(path[big], total[big], ep[big]) if big.sum() >= 3 else (None, None)
    return {
        "fraction": frac, "fraction_ci": frac_ci, "total_fraction": tot,
        "total_fraction_ci": tot_ci, "path_over_total": pot, "path_over_total_ci": pot_ci,
        "n_substantial": int(big.sum()), "layer_profile": lay, "layer_profile_ci": lay_ci,
        "n_pairs": int(keep.sum()), "n_skipped": int((~keep).sum()),
        "ld_clean_mean": float(ld_c[keep].mean()), "senders": senders,
    }  # fmt: skip


def mediation_summary(
    model: TransformerBridge, fmt: TranscriptFormat, records: Sequence[StepRecord], *,
    n_pairs: int = 32, seed: int = 0, n_boot: int = 1000,
    tokenizer: PreTrainedTokenizerBase | None = None, cfg: BanditConfig | None = None,
    history_fn: HistoryFn | None = None, text_fn: TextFn | None = None,
) -> dict:  # fmt: skip
    """The report layer's mediation numbers from played :class:`~kdgap.records.StepRecord` s.

    The :data:`MEDIATION_PARTS` on ``n_pairs`` conclusion and history edits, every effect
    normalised by the full-flip effect (:data:`DEFINITION`). Use off-policy records
    (``play(..., driver="random")``): a bypass organism's own play pulls one arm forever.

    Args:
        model: a TransformerBridge in eval mode; fmt: the format the records were played in.
        records: StepRecords with ``prompt`` and ``completion``.
        n_pairs: pairs of each kind; seed: pair sampling and bootstrap; n_boot: resamples.
        tokenizer: default ``model.tokenizer``; cfg, history_fn, text_fn: see
            ``pairs_from_records`` (``text_fn`` chat-templates the prompts as the agent did).

    Returns:
        JSON-ready dict with ``mediated_fraction`` (+ ``_ci``), ``total_effect_fraction``,
        ``history_effect_fraction`` (+ ``_ci``), ``layers`` ``[layer]``, ``layer_profile``
        ``[layer]``, ``layer_profile_ci`` ``[layer][2]``, ``n_pairs``, ``definition``, and
        the full ``conclusion`` / ``history`` / ``history_via_rationale`` breakdowns.
    """
    parts = [
        mediation_part(model, fmt, records, kind, senders, seed=seed, n_boot=n_boot,
                       tokenizer=tokenizer, n_pairs=n_pairs, cfg=cfg, history_fn=history_fn,
                       text_fn=text_fn)
        for kind, senders in MEDIATION_PARTS
    ]  # fmt: skip
    return summary_from_parts(parts, int(model.cfg.n_layers))


#: :func:`mediation_summary`'s three independent measurements, ``(edit kind, senders)``.
MEDIATION_PARTS = (("conclusion", "rationale"), ("history", "history"), ("history", "rationale"))


def mediation_part(
    model: TransformerBridge, fmt: TranscriptFormat, records: Sequence[StepRecord], kind: str,
    senders: str, *, seed: int = 0, n_boot: int = 1000,
    tokenizer: PreTrainedTokenizerBase | None = None, **pair_kwargs: Any,
) -> dict:  # fmt: skip
    """A :data:`MEDIATION_PARTS` item: :func:`flip_mediation` of ``kind`` edits, ``senders``."""
    tokenizer = model_tokenizer(model, tokenizer)
    pairs = pairs_from_records(records, fmt, kind, seed=seed, tokenizer=tokenizer, **pair_kwargs)
    return flip_mediation(model, pairs, tokenizer, fmt, senders=senders, n_boot=n_boot, seed=seed)


def summary_from_parts(parts: Sequence[dict], n_layers: int) -> dict:
    """:func:`mediation_summary`'s dict from its :data:`MEDIATION_PARTS` results, in order."""
    c, h, hr = parts
    return {
        "mediated_fraction": c["fraction"], "mediated_fraction_ci": c["fraction_ci"],
        "total_effect_fraction": c["total_fraction"],
        "history_effect_fraction": h["total_fraction"],
        "history_effect_fraction_ci": h["total_fraction_ci"],
        "layers": list(range(n_layers)), "layer_profile": c["layer_profile"],
        "layer_profile_ci": c["layer_profile_ci"], "n_pairs": c["n_pairs"],
        "definition": DEFINITION, "conclusion": c, "history": h, "history_via_rationale": hr,
    }  # fmt: skip


def example_heatmap(
    model: TransformerBridge, fmt: TranscriptFormat, record: StepRecord, *,
    tokenizer: PreTrainedTokenizerBase | None = None, seed: int = 0,
    cfg: BanditConfig | None = None, history_fn: HistoryFn | None = None,
    text_fn: TextFn | None = None,
) -> dict:  # fmt: skip
    """Noising ``resid_pre`` sweep of one conclusion edit, for the report's heatmap figure.

    The pair is built as in :func:`~kdgap.hooks.patch.pairs.pairs_from_records` (edited arm
    neither the clean conclusion nor the action; ``seed`` picks it). Cell ``(l, p)`` is the
    clean run with ``resid_pre`` of layer ``l`` at position ``p`` taken from the corrupt
    run, normalised by the full flip: ``(LD_clean - LD_patched) / (2 * LD_clean)`` (1: the
    action fully follows the edited conclusion; 0: no change).

    Returns:
        JSON-ready dict: ``values`` ``[layer][pos]``, ``tokens`` ``[pos]`` (clean token
        strings), ``edited_tokens`` ``[pos]``, ``ld_clean``, ``ld_corrupt``, ``arms``
        (clean action, edited arm names), ``layers``, ``definition``.

    Raises:
        ValueError: the record gives no conclusion pair, or its ``LD_clean <= 0``.
    """
    tokenizer = model_tokenizer(model, tokenizer)
    made = pairs_from_records([record], fmt, "conclusion", n_pairs=1, seed=seed, cfg=cfg,
                              history_fn=history_fn, text_fn=text_fn,
                              tokenizer=tokenizer)  # fmt: skip
    if not made:
        raise ValueError(
            f"record (episode {record.episode}, step {record.step}) gives no conclusion edit: "
            "no parsable conclusion, or no arm other than its conclusion and action."
        )
    pair = made[0].pair
    (group,) = tokenize_pairs([pair], tokenizer, fmt)
    res = patch_sweep(model, group.clean_tokens, group.corrupt_tokens, group.metric,
                      "resid_pre", direction="noise")  # fmt: skip
    ld_c = float(res.ld_clean[0])
    if ld_c <= 0:
        raise ValueError(f"LD_clean = {ld_c:.3g} <= 0: the record's action is not the argmax.")
    values = (ld_c - res.values[0]) / (2 * ld_c)
    return {
        "values": values.tolist(),
        "tokens": tokenizer.convert_ids_to_tokens(group.clean_tokens[0].tolist()),
        "edited_tokens": tokenizer.convert_ids_to_tokens(group.corrupt_tokens[0].tolist()),
        "ld_clean": ld_c, "ld_corrupt": float(res.ld_corrupt[0]),
        "arms": [pair.arm_names[pair.arm_a], pair.arm_names[pair.arm_b]],
        "layers": list(range(values.shape[0])),
        "definition": "(LD_clean - LD_patched) / (2 * LD_clean), noising resid_pre",
    }  # fmt: skip
