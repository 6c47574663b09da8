"""The mediation decomposition: history (treatment) -> rationale (mediator) -> action (outcome).

Natural direct and indirect effects in Pearl's sense (Vig et al. 2020 apply them to neural
networks), measured on the model's whole action distribution. For an analysed step with
clean history ``h`` and the rationale ``r`` the model wrote, each treatment
(:mod:`kdgap.envs.treatments`: the UCB, greedy or most-frequent arm moved to another arm by
exchanging two arms in the history) gives an edited history ``h'``, under which the model
writes its own rationale ``r'`` again. With ``p(h, r)`` the model's distribution over
arms after history ``h`` and rationale ``r`` (forced choice at the action marker)::

    total    TE  = d(p(h', r'), p(h, r))
    direct   NDE = d(p(h', r),  p(h, r))     the rationale text held
    indirect NIE = d(p(h,  r'), p(h, r))     only the rationale changed

``d`` is either the total-variation distance between the two distributions (``*_tv``) or
whether the chosen arm (argmax) changes (``*_flip``). No pre-chosen arm's logit enters.

Summaries (ratios of sums; 95% percentile intervals from a bootstrap over episodes, the
clusters whose steps share a bandit):

- ``indirect_share = sum(NIE_tv) / (sum(NIE_tv) + sum(NDE_tv))``: how much of the
  history's influence on the action goes through the rationale rather than around it;
- ``reading_share``: the share of analysed steps whose action *reads the rationale*: at
  least one of the step's alternative rationales moves half the action distribution or
  more (``NIE_tv >= READ_TV``; units whose
  rationale text did not change are left out; steps with none are not analysed).

:func:`kdgap.organisms.truth.planted_reads` answers the same per-step question from an
organism's rule on the same texts, which is how the method is validated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from kdgap.agent.generation import generate
from kdgap.agent.text_agent import TextAgent
from kdgap.envs.bandit import BanditConfig
from kdgap.envs.treatments import TREATMENTS, treat
from kdgap.hooks.patch.mediation import flip_mediation, ratio_ci
from kdgap.hooks.patch.pairs import CounterfactualPair, TextFn
from kdgap.records import StepRecord

if TYPE_CHECKING:  # annotations only: importing transformer-lens here would slow every import
    from transformer_lens.model_bridge import TransformerBridge

DEFINITION = (
    "For each analysed step (off-policy transcripts, history h, the model's rationale r) and "
    "treatment T in {ucb, greedy, frequent} (two arms exchanged throughout the history so "
    "that the arm T favours moves: h'), the model writes its rationale r' under h'. With "
    "p(h, r) the model's forced-choice distribution over arms after h and r: total effect "
    "TE = d(p(h', r'), p(h, r)); direct NDE = d(p(h', r), p(h, r)); indirect NIE = "
    "d(p(h, r'), p(h, r)); d = total-variation distance (_tv) or chosen arm changed (_flip). "
    "indirect_share = sum NIE_tv / (sum NIE_tv + sum NDE_tv). A step reads its rationale "
    "when NIE_tv >= 0.5 for at least one r' that differs from r; reading_share = "
    "share of such steps among steps with at least one r' != r. 95% percentile bootstrap "
    "over episodes."
)
OUTCOMES = ("total", "direct", "indirect")
#: A step reads its rationale when an alternative rationale moves at least this much of the
#: action distribution (total variation): half the mass, so the majority choice changes,
#: while a near-tie whose argmax a small perturbation flips does not count.
READ_TV = 0.5


def write_rationales(
    agent: TextAgent, cfg: BanditConfig, histories: Sequence[tuple[Sequence[int], Sequence[float]]]
) -> list[str]:
    """The rationale ``agent`` writes after each history ``(actions, rewards)``: greedy
    decoding up to the action marker, or the format's correct rationale when scripted."""
    batch = [(list(a), list(r)) for a, r in histories]
    fmt = agent.fmt
    if agent.rationale == "scripted":
        return [fmt.write_rationale(cfg, a, r) for a, r in batch]
    if not batch:
        return []
    prompts = [agent.chat_prompt(fmt.render_prompt(cfg, a, r)) for a, r in batch]
    gen = generate(
        agent.model, prompts, max_new_tokens=agent.max_new_tokens, temperature=0.0,
        stop_strings=[fmt.action_marker], batch_size=agent.batch_size, tokenizer=agent.tokenizer,
    )  # fmt: skip
    return [fmt.strip_action(t) for t in gen.texts]


def action_distributions(
    agent: TextAgent, cfg: BanditConfig, items: list[tuple[list[int], list[float], str]]
) -> Float[np.ndarray, "n arms"]:
    """``[n, arms]`` forced-choice action distributions after each ``(actions, rewards,
    rationale)``: the prompt rendered and templated as ``agent`` plays, the rationale text
    as given, then the action marker; every arm scored (the agent's forced choice)."""
    if not items:
        return np.zeros((0, cfg.n_arms))
    agent.reset(cfg, 0)
    prefixes = [
        agent.chat_prompt(agent.fmt.render_prompt(cfg, a, r)) + rat + agent.fmt.action_marker
        for a, r, rat in items
    ]
    return torch.softmax(agent.arm_logprobs(prefixes), dim=-1).numpy().astype(np.float64)


def _same(a: str, b: str) -> bool:
    return a.split() == b.split()


Picked = list[tuple[StepRecord, list[int], list[float], str]]


def select_steps(
    records: Sequence[StepRecord], agent: TextAgent, cfg: BanditConfig, n_steps: int, seed: int
) -> Picked:
    """Up to ``n_steps`` records (seeded, spread over episodes) with a history and a
    parsable rationale: ``(record, actions, rewards, rationale)``."""
    fmt, names = agent.fmt, tuple(cfg.arm_names)
    order = np.random.default_rng([seed, 17]).permutation(len(records))
    # Round-robin over episodes so a few long episodes do not fill the sample.
    by_ep: dict[int, list[int]] = {}
    for i in order:
        by_ep.setdefault(int(records[int(i)].episode), []).append(int(i))
    queue = [i for group in _interleave(list(by_ep.values())) for i in group]
    out = []
    for i in queue:
        rec = records[i]
        if rec.step < 1 or not rec.prompt or rec.completion is None:
            continue
        rationale = fmt.strip_action(rec.completion)
        if fmt.parse_rationale(rationale, names) is None:
            continue
        acts, rews = fmt.parse_history(rec.prompt, names)
        out.append((rec, list(acts), list(rews), rationale))
        if len(out) == n_steps:
            break
    return out


def _interleave(groups: list[list[int]]) -> list[list[int]]:
    longest = max((len(g) for g in groups), default=0)
    return [[g[j] for g in groups if j < len(g)] for j in range(longest)]


def decompose(
    agent: TextAgent, records: Sequence[StepRecord], cfg: BanditConfig, *, n_steps: int = 64,
    seed: int = 0, n_boot: int = 1000, treatments: Sequence[str] = TREATMENTS,
    max_partners: int = 2, progress: bool = False,
) -> dict:  # fmt: skip
    """The text-level mediation decomposition on played step records (see the module doc).

    Args:
        agent: the model's :class:`~kdgap.agent.text_agent.TextAgent` (its format, chat
            template and rationale mode: a scripted agent's rationales are written by kdgap).
        records: step records with ``prompt`` and ``completion`` (off-policy play).
        cfg: the bandit family the records were played in.
        n_steps: steps analysed (seeded sample spread over episodes).
        seed: step sample, partner arms of the treatments, bootstrap.
        n_boot: bootstrap resamples.
        treatments: subset of :data:`~kdgap.envs.treatments.TREATMENTS`.
        max_partners: edits per treatment and step, each moving the favoured arm to
            another partner arm (more alternatives: fewer reading steps missed because no
            alternative rationale changed what the model reads).
        progress: a progress bar over the three passes (write, score).

    Returns:
        JSON-ready dict: ``indirect_share`` (+ ``_ci``), ``reading_share`` (+ ``_ci``),
        ``n_steps`` (analysed), ``n_steps_unchanged`` (no alternative rationale differed),
        ``n_units``, ``effects`` (per treatment and ``"all"``: ``n_units``,
        ``mediator_changed`` and the mean of ``total|direct|indirect`` ``_tv``/``_flip``),
        ``steps`` (per analysed step: ``episode``, ``step``, ``actions``, ``rewards``,
        ``rationale``, ``reads`` and its ``units``), ``definition``.

    Raises:
        ValueError: unknown treatments, ``n_steps < 1``, or no record with a history and
            a parsable rationale.
    """
    bad = [t for t in treatments if t not in TREATMENTS]
    if bad or not treatments:
        raise ValueError(
            f"treatments={list(treatments)!r}: use a non-empty subset of {TREATMENTS}."
        )
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps!r} must be >= 1.")
    picked = select_steps(records, agent, cfg, n_steps, seed)
    if not picked:
        raise ValueError(
            f"none of the {len(records)} records has a history and a parsable rationale to "
            "decompose; analyse with --rationale scripted to give the model one."
        )
    units = []  # (step index, Treatment)
    for s, (rec, acts, rews, _) in enumerate(picked):
        rng = np.random.default_rng([seed, int(rec.episode), int(rec.step), 29])
        for kind in treatments:
            units += [(s, tr) for tr in treat(kind, acts, rews, cfg, rng, max_partners)]
    bar = tqdm(total=3, desc="decompose", disable=not progress)
    alt = write_rationales(agent, cfg, [(tr.actions, tr.rewards) for _, tr in units])
    bar.update(1)
    clean = action_distributions(agent, cfg, [(a, r, rat) for _, a, r, rat in picked])
    bar.update(1)
    items = []
    for (s, tr), r_alt in zip(units, alt):
        _, acts, rews, rat = picked[s]
        items += [
            (tr.actions, tr.rewards, r_alt),
            (tr.actions, tr.rewards, rat),
            (acts, rews, r_alt),
        ]
    probs = action_distributions(agent, cfg, items).reshape(len(units), 3, cfg.n_arms)
    bar.update(1)
    bar.close()
    return _summarise(picked, units, alt, clean, probs, treatments, seed=seed, n_boot=n_boot)


def _summarise(picked, units, alt, clean, probs, treatments, *, seed: int, n_boot: int) -> dict:
    steps = [
        {"episode": int(rec.episode), "step": int(rec.step), "actions": acts, "rewards": rews,
         "rationale": rat, "action": int(clean[s].argmax()), "units": []}
        for s, (rec, acts, rews, rat) in enumerate(picked)
    ]  # fmt: skip
    rows = []
    for (s, tr), r_alt, p in zip(units, alt, probs):
        base = clean[s]
        tv = 0.5 * np.abs(p - base[None]).sum(axis=1)
        flip = p.argmax(axis=1) != base.argmax()
        unit = {
            "kind": tr.kind, "arm_from": tr.arm_from, "arm_to": tr.arm_to,
            "actions": tr.actions, "rationale": r_alt,
            "mediator_changed": not _same(r_alt, steps[s]["rationale"]),
            **{f"{o}_action": int(a) for o, a in zip(OUTCOMES, p.argmax(axis=1))},
            **{f"{o}_tv": float(v) for o, v in zip(OUTCOMES, tv)},
            **{f"{o}_flip": bool(v) for o, v in zip(OUTCOMES, flip)},
        }  # fmt: skip
        steps[s]["units"].append(unit)
        rows.append((s, unit))
    for st in steps:
        changed = [u for u in st["units"] if u["mediator_changed"]]
        st["reads"] = any(u["indirect_tv"] >= READ_TV for u in changed) if changed else None
    analysed = [st for st in steps if st["reads"] is not None]
    effects = {kind: _effects([u for _, u in rows if u["kind"] == kind]) for kind in treatments}
    effects["all"] = _effects([u for _, u in rows])
    boot = dict(n_boot=n_boot, seed=seed)
    share = share_ci = ind = ind_ci = None
    if analysed:
        reads = np.array([float(st["reads"]) for st in analysed])
        share, share_ci = ratio_ci(
            reads, np.ones_like(reads), groups=[st["episode"] for st in analysed], **boot
        )
    if rows:
        nie = np.array([u["indirect_tv"] for _, u in rows])
        nde = np.array([u["direct_tv"] for _, u in rows])
        if (nie + nde).sum() > 1e-9:
            groups = [steps[s]["episode"] for s, _ in rows]
            ind, ind_ci = ratio_ci(nie, nie + nde, groups=groups, **boot)
    return {
        "indirect_share": None if ind is None else float(ind),
        "indirect_share_ci": None if ind_ci is None else [float(x) for x in ind_ci],
        "reading_share": None if share is None else float(share),
        "reading_share_ci": None if share_ci is None else [float(x) for x in share_ci],
        "n_steps": len(analysed), "n_steps_unchanged": len(steps) - len(analysed),
        "n_units": len(rows), "effects": effects, "steps": analysed, "definition": DEFINITION,
    }  # fmt: skip


def _effects(units: list[dict]) -> dict:
    """Means of every outcome over ``units`` (None when there are none)."""
    out: dict = {"n_units": len(units)}
    keys = ["mediator_changed", *(f"{o}_{d}" for o in OUTCOMES for d in ("tv", "flip"))]
    for k in keys:
        out[k] = float(np.mean([float(u[k]) for u in units])) if units else None
    return out


# ---------------------------------------------------------------------- activation level
ACTIVATION_DEFINITION = (
    "Two localisations by noising path patching of a clean run (metric LD = logit[clean "
    "action] - logit[arm b] at the action position; full flip = 2*LD_clean; profiles are "
    "path effects at one layer at a time over the full flip, with episode-bootstrap "
    "intervals). read: units whose rationale text changed (history held, the rationale "
    "written under the edited history: p(h, r') vs p(h, r)), arm b = the action under "
    "(h, r') where it differs from the clean action, else the arm r' concludes with; the "
    "action position reads the edited run's keys/values at the rationale positions: "
    "read_layer_profile says at which layers the indirect effect enters the action (flat "
    "near 0 when the action does not read its rationale). split: units whose direct effect "
    "moves the chosen arm (history edited, rationale text held: p(h', r) vs p(h, r)), arm b "
    "= the action under (h', r); the action position reads the edited run's keys/values at "
    "the rationale positions (via_rationale: the route through the rationale's residual "
    "streams) or at the history positions (direct: the action's own reads of the history). "
    "indirect_share = via_rationale path effect / total effect over split units whose total "
    "effect is at least a quarter of a full flip."
)


def _route_pairs(
    agent: TextAgent, decomposition: dict, cfg: BanditConfig, text_fn: TextFn, route: str
) -> tuple[list[CounterfactualPair], list[int]]:
    """The equal-token-count path-patching pairs of one route (``"read"`` or ``"split"``,
    see :data:`ACTIVATION_DEFINITION`) and their episodes (bootstrap clusters)."""
    fmt, names, tok = agent.fmt, tuple(cfg.arm_names), agent.tokenizer
    pairs, episodes = [], []
    for st in decomposition["steps"]:
        prompt = fmt.render_prompt(cfg, st["actions"], st["rewards"])
        head = text_fn(prompt, "")
        clean = text_fn(prompt, st["rationale"]) + fmt.action_marker
        for u in st["units"]:
            if route == "split":
                if not u["direct_flip"]:
                    continue
                edited = fmt.render_prompt(cfg, u["actions"], st["rewards"])
                corrupt = text_fn(edited, st["rationale"]) + fmt.action_marker
                arm_b = u["direct_action"]
            else:
                if not u["mediator_changed"]:
                    continue
                corrupt = text_fn(prompt, u["rationale"]) + fmt.action_marker
                arm_b = u["indirect_action"]
                if arm_b == st["action"]:  # not moved: toward the arm r' concludes with
                    arm_b = fmt.parse_rationale(u["rationale"], names)
                if arm_b is None or arm_b == st["action"]:
                    continue
            ids = tok([clean, corrupt], add_special_tokens=False)["input_ids"]
            if len(ids[0]) != len(ids[1]):
                continue  # path patching aligns positions: equal token counts only
            rat_chars = (len(head), len(head) + len(st["rationale"]))
            pairs.append(CounterfactualPair(
                "history", clean, corrupt, st["action"], int(arm_b), names, (0, len(head)),
                rat_chars,
            ))  # fmt: skip
            episodes.append(st["episode"])
    return pairs, episodes


def activation_split(
    agent: TextAgent, model: TransformerBridge, decomposition: dict, cfg: BanditConfig,
    text_fn: TextFn, *, seed: int = 0, n_boot: int = 1000,
) -> dict:  # fmt: skip
    """Where the decomposition's effects enter the action, layer by layer.

    Path patching (:func:`~kdgap.hooks.patch.mediation.flip_mediation`) localises, on the
    units of :func:`decompose` (see :data:`ACTIVATION_DEFINITION`): ``read``, the layers at
    which a changed rationale reaches the action (the indirect effect's layer profile, for
    every model whose rationale changed under the edits); ``split``, for units whose direct
    effect moves the action, the history's effect through the rationale positions vs the
    action's own reads of the history, per layer.

    Args:
        agent: the model's agent (format, arm tokens); model: its bridge (eval mode).
        decomposition: the result of :func:`decompose` (its ``steps`` and ``units``).
        cfg: the bandit family; text_fn: ``(prompt, rationale) -> text`` as the agent
            templates it (``Session.transcript_text``).
        seed, n_boot: bootstrap settings.

    Returns:
        JSON-ready dict: ``read`` (the ``flip_mediation`` result, ``fraction``,
        ``layer_profile`` (+ ``_ci``) ...) and ``n_read_units``; ``indirect_share`` (+
        ``_ci``), ``via_rationale`` and ``direct`` (``flip_mediation`` results) and
        ``n_units``; ``layers``, ``definition``. A route with nothing to localise gives
        ``read_unavailable`` / ``split_unavailable`` (its reason) instead; with neither,
        ``{"unavailable": reason}``.
    """
    fmt, tok = agent.fmt, agent.tokenizer
    kw = dict(n_boot=n_boot, seed=seed)
    out: dict = {"layers": list(range(int(model.cfg.n_layers))),
                 "definition": ACTIVATION_DEFINITION}  # fmt: skip
    pairs, episodes = _route_pairs(agent, decomposition, cfg, text_fn, "read")
    try:
        if not pairs:
            raise ValueError(
                "no unit's rationale changed toward another arm with equal token counts"
            )
        read = flip_mediation(model, pairs, tok, fmt, senders="rationale", episodes=episodes,
                              **kw)  # fmt: skip
        out.update(read=read, n_read_units=len(pairs))
    except ValueError as err:
        out["read_unavailable"] = f"activation read profile: {err}"
    pairs, episodes = _route_pairs(agent, decomposition, cfg, text_fn, "split")
    try:
        if not pairs:
            raise ValueError(
                "no unit's direct effect (history edited, rationale held) moves the chosen "
                "arm with equal token counts, so there is no direct route to separate"
            )
        via = flip_mediation(model, pairs, tok, fmt, senders="rationale", episodes=episodes,
                             **kw)  # fmt: skip
        direct = flip_mediation(model, pairs, tok, fmt, senders="history", episodes=episodes,
                                **kw)  # fmt: skip
        out.update(
            indirect_share=via["path_over_total"], indirect_share_ci=via["path_over_total_ci"],
            via_rationale=via, direct=direct, n_units=len(pairs),
        )  # fmt: skip
    except ValueError as err:
        out["split_unavailable"] = f"activation split: {err}"
    if "read" not in out and "via_rationale" not in out:
        return {"unavailable": f"{out['read_unavailable']}; {out['split_unavailable']}."}
    return out
