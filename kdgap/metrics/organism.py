"""Play and score organisms: a fast greedy policy and the acceptance numbers of issue 3.

:class:`OrganismPolicy` is a development stand-in for ``kdgap.agent.text_agent.TextAgent``
in forced mode, going through the same text path (``OrganismFormat`` prompt ->
tokenizer -> greedy generation of the rationale -> append the action marker -> score every
arm). It exploits only what the organism language guarantees (a fixed rationale length,
equal prompt lengths across a batch at one step) to decode without padding.

:func:`organism_metrics` turns step records into the acceptance numbers (rationale
correct, valid, follows-rationale, greedy/frequent shares, counterfactual flip rate and
the knowing-doing matrix of science.md section 1 with "optimal wins ties").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kdgap.envs.bandit import BanditConfig
from kdgap.metrics import knowing_doing as km
from kdgap.metrics.behavior import invalid_rate
from kdgap.organisms.language import OrganismLanguage
from kdgap.organisms.transcript import OrganismFormat
from kdgap.policies.reference import Decisions, HistoryBatch
from kdgap.records import StepRecord

#: science.md section 1, Gemma2 27B: rows correct / incorrect rationale, columns greedy /
#: optimal / other, percent of all steps.
SEED_KD_MATRIX = tuple(
    tuple(100 * km.PAPER_KD_MATRIX[row][c] for c in ("greedy", "optimal", "other"))
    for row in ("correct", "incorrect")
)


class OrganismPolicy:
    """Greedy forced-choice play of an organism (a :class:`~kdgap.policies.reference.Policy`).

    Args:
        model: the organism bridge (eval mode); tokenizer: its tokenizer.
        counterfactual: also edit the rationale's conclusion to a random other arm
            (seeded per episode and step), re-score and fill ``cf_actions``.
        name: policy name in records.
    """

    def __init__(self, model, tokenizer, *, counterfactual: bool = False, name: str = "organism"):
        self.model, self.tokenizer = model, tokenizer
        self.counterfactual = counterfactual
        self.name = name
        self.fmt = OrganismFormat()
        self._seed = 0

    @property
    def _device(self) -> torch.device:
        # The weights' device (a bridge's cfg.device can be unset).
        return next(self.model.parameters()).device

    def reset(self, cfg: BanditConfig, seed: int) -> None:
        """Remember the seed (invalid actions and counterfactual arms are seeded by it)."""
        self._seed = int(seed)

    @torch.no_grad()
    def _generate(self, tokens: torch.Tensor, n_new: int) -> torch.Tensor:
        """Greedily append ``n_new`` tokens to ``tokens`` ``[n, L]`` -> ``[n, L + n_new]``."""
        for _ in range(n_new):
            nxt = self.model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
        return tokens

    def _cut(self, ids: list[int]) -> str:
        """Decoded completion, cut before the first EOS and just after the first ``act``
        (the text agent's stop rules, so both paths see the same rationale)."""
        act = self.tokenizer.convert_tokens_to_ids(self.fmt.action_marker)
        out = []
        for i in ids:
            if i == self.tokenizer.eos_token_id:
                break
            out.append(i)
            if i == act:
                break
        return self.tokenizer.decode(out, skip_special_tokens=True)

    @torch.no_grad()
    def _score_arms(self, texts: list[str], arm_names: Sequence[str]) -> np.ndarray:
        """Log-probs ``[n, arms]`` of each arm word right after each text (ends in the marker)."""
        rows = self.tokenizer(texts)["input_ids"]
        lengths = torch.tensor([len(r) for r in rows])
        # Right padding is harmless under causal attention: read each row at its own end.
        tok = torch.full((len(rows), int(lengths.max())), self.tokenizer.pad_token_id)
        for i, r in enumerate(rows):
            tok[i, : len(r)] = torch.tensor(r)
        logits = self.model(tok.to(self._device))[torch.arange(len(rows)), lengths - 1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"][0]
               for a in arm_names for c in self.fmt.arm_continuations(a)]  # fmt: skip
        return logp[:, ids].cpu().numpy()

    def act(self, history: HistoryBatch) -> Decisions:
        """Generate rationales, then choose the arm the model scores highest after ``act``."""
        cfg, n = history.cfg, history.n
        names = cfg.arm_names
        lang = OrganismLanguage(n_arms=cfg.n_arms, horizon=max(cfg.horizon, 1))
        prompts = [self.fmt.render_prompt(cfg, a, r) for a, r in zip(history.actions,
                                                                     history.rewards)]  # fmt: skip
        tok = self.tokenizer(prompts, return_tensors="pt")["input_ids"].to(self._device)
        gen = self._generate(tok, lang.rationale_len + 1)[:, tok.shape[1] :]
        completions = [self._cut(g) for g in gen.tolist()]
        rationales = [self.fmt.strip_action(c) for c in completions]
        texts = [p + r + self.fmt.action_marker for p, r in zip(prompts, rationales)]
        scores = self._score_arms(texts, names)
        actions = scores.argmax(axis=1).astype(np.int64)
        rat = np.array([-1 if (x := self.fmt.parse_rationale(c, names)) is None else x
                        for c in completions], dtype=np.int64)  # fmt: skip
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        extras = {}
        if self.counterfactual:
            rngs = [np.random.default_rng([self._seed, int(e), history.t, 5])
                    for e in history.episodes]  # fmt: skip
            cf_arm = np.full(n, -1, np.int64)
            cf_texts = list(texts)
            for j in range(n):
                if rat[j] < 0:
                    continue
                cf_arm[j] = (rat[j] + rngs[j].integers(1, cfg.n_arms)) % cfg.n_arms
                edited = self.fmt.edit_conclusion(rationales[j], int(cf_arm[j]), names)
                cf_texts[j] = prompts[j] + edited + self.fmt.action_marker
            cf_actions = self._score_arms(cf_texts, names).argmax(axis=1).astype(np.int64)
            extras = {"cf_rationale_arms": cf_arm, "cf_actions": np.where(cf_arm < 0, -1,
                                                                           cf_actions)}  # fmt: skip
        full = [r + self.fmt.action_marker + self.fmt.arm_continuations(names[a])[0]
                for r, a in zip(rationales, actions)]  # fmt: skip
        return Decisions(actions=actions, valid=np.ones(n, bool), rationale_arms=rat,
                         action_probs=probs, prompts=prompts, completions=full,
                         extras=extras)  # fmt: skip

    def action_distribution(self, history: HistoryBatch) -> np.ndarray:
        """``[n, arms]`` softmax of the arm scores after the generated rationale."""
        return self.act(history).action_probs


def _share(x: Sequence[bool]) -> float | None:
    return float(np.mean(x)) if len(x) else None


def organism_metrics(records: Sequence[StepRecord]) -> dict:
    """Acceptance numbers of a run (shares in [0, 1]; the matrix in percent of steps).

    A thin view over :mod:`kdgap.metrics` (the definitions every model is measured with)
    plus organism-specific breakdowns. Returns a dict with ``rationale_correct`` (overall
    and ``_t<lo>`` buckets 0-19, 20-34, 35+), ``valid``, ``follows_rationale`` (and
    ``_when_wrong``), ``action_greedy``, ``action_frequent``, ``action_ucb``,
    ``counterfactual_flip_rate``, ``kd_matrix`` (2 x 3: rows correct / incorrect
    rationale, columns greedy / optimal / other as the paper's table; optimal wins ties)
    and ``kd_matrix_max_abs_diff`` (percentage points) against :data:`SEED_KD_MATRIX`.
    """
    recs = list(records)
    if not recs:
        raise ValueError("records is empty: play at least one step.")
    has_rat = [r for r in recs if r.rationale_arm is not None]
    matches = km.action_matches(recs)
    out: dict = {
        "steps": len(recs),
        "rationale_parsed": len(has_rat) / len(recs),
        "rationale_correct": km.rationale_correct(recs),
        "valid": 1.0 - invalid_rate(recs),
        "follows_rationale": km.action_follows_rationale(recs),
        "follows_rationale_when_wrong": km.action_follows_rationale(
            [r for r in has_rat if not r.rationale_correct]
        ),
        "action_greedy": matches["greedy"],
        "action_frequent": matches["most_frequent"],
        "action_ucb": matches["optimal"],
    }
    for lo, hi in ((0, 20), (20, 35), (35, 10_000)):
        out[f"rationale_correct_t{lo}"] = km.rationale_correct(
            [r for r in recs if lo <= r.step < hi]
        )
    cf = [r for r in recs if r.cf_action is not None]
    out["counterfactual_flip_rate"] = km.counterfactual_flip_rate(recs)
    out["counterfactual_follows_edit"] = _share([r.cf_action == r.cf_rationale_arm for r in cf])
    kd = km.kd_matrix(recs)
    cols = ("greedy", "optimal", "other")  # the paper's column order
    m = 100 * np.array([[kd[row][c] for c in cols] for row in ("correct", "incorrect")])
    out["kd_matrix"] = np.round(m, 2).tolist()
    out["kd_matrix_max_abs_diff"] = float(np.abs(m - np.array(SEED_KD_MATRIX)).max())
    return out
