"""Latent knowledge: which reference arms are linearly decodable at a site, layer by layer.

The knowing-doing probes need a rationale the model wrote; a model that writes none (small
or base models, unparsable text) can still *encode* the arm it should pick. This probes the
arms computed from the history itself at the probe site (the true UCB arm, the greedy arm,
the most-frequent arm), so even a rationale-free model gets an answer to "does it know,
somewhere inside, which arm is best?". One logistic sweep per label
(:func:`~kdgap.probes.sweep.sweep`, episode-grouped split, rare classes dropped); a label
that cannot be probed (one class in these transcripts) is reported with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence

from kdgap.probes.dataset import ActivationSource
from kdgap.probes.sweep import sweep

#: Arms computed from the history alone, probed at the site.
LATENT_LABELS = ("ucb_arm", "greedy_arm", "frequent_arm")
DEFINITION = (
    "accuracy of a logistic probe decoding each reference arm (computed from the history, "
    "not from the model's text) from the residual stream at the site, per layer; held-out "
    "episodes, 95% episode-bootstrap intervals; chance = the test accuracy of always "
    "predicting the training episodes' majority arm."
)


def latent_knowledge(
    store: ActivationSource,
    *,
    site: str = "action",
    labels: Sequence[str] = LATENT_LABELS,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Per label, held-out probe accuracy per layer at ``site`` (JSON-ready).

    Returns:
        ``{"site", "layers": [L], "labels", "accuracy": {label: [L] | None}, "ci": {label:
        [L][2] | None}, "chance": {label: float | None}, "unavailable": {label: str |
        None}, "definition"}``; a label's entries are None where ``unavailable`` gives the
        reason.
    """
    out: dict = {"site": site, "layers": None, "labels": list(labels), "accuracy": {},
                 "ci": {}, "chance": {}, "unavailable": {}, "definition": DEFINITION}  # fmt: skip
    for label in labels:
        try:
            df = sweep(store, labels=[label], sites=[site], probes=("logistic",),
                       rare_classes="drop", n_boot=n_boot, seed=seed)  # fmt: skip
        except ValueError as err:
            out["accuracy"][label] = out["ci"][label] = out["chance"][label] = None
            out["unavailable"][label] = str(err)
            continue
        df = df.sort_values("layer")
        out["layers"] = [int(v) for v in df["layer"]]
        out["accuracy"][label] = [float(v) for v in df["accuracy"]]
        out["ci"][label] = [[float(a), float(b)] for a, b in zip(df["ci_low"], df["ci_high"])]
        out["chance"][label] = float(df["chance"].iloc[0])
        out["unavailable"][label] = None
    return out
