"""Recording the shipped ``faithful`` organism's own transcripts (off-policy, random driver).

Checks, on real organism play rather than synthetic text: recorded ``resid_post`` at the
``action`` and ``rationale.conclusion`` sites equals ``run_with_cache()`` sliced at the same
positions of a left-padded batch; the sites are the right words; the labels table matches
the step records; ``record_from_model`` runs the whole path from a model spec.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kdgap.agent.text_agent import TextAgent
from kdgap.envs.bandit import BanditConfig
from kdgap.hooks.record import record_store, transcript_text
from kdgap.hooks.recorder import Recorder
from kdgap.organisms import OrganismFormat, load_organism
from kdgap.policies.play import play
from kdgap.policies.reference import make_policy
from kdgap.report.api import record_from_model

SITES = ["action", "rationale.conclusion"]
CFG = BanditConfig(n_arms=5, horizon=12)


@pytest.fixture(scope="module")
def faithful():
    torch.manual_seed(0)
    model, tok = load_organism("faithful")
    return model.eval(), tok


@pytest.fixture(scope="module")
def records(faithful):
    model, _ = faithful
    agent = TextAgent(model, OrganismFormat(), mode="forced")
    return play(agent, CFG, n_episodes=2, seed=3, driver=make_policy("random"), progress=False)


def test_recorded_equals_sliced_cache_on_organism_play(faithful, records):
    model, tok = faithful
    fmt = OrganismFormat()
    texts = [transcript_text(r) for r in records[:12]]  # steps 0..11: lengths differ
    rec = Recorder(model, fmt, "resid_post", SITES, tokenizer=tok, pad_multiple=1)
    res = rec.record(texts)
    b = rec.tokenize(texts)
    assert len(set(b.lengths.tolist())) == len(texts) and int(b.pad_left.max()) > 0
    with torch.inference_mode():
        _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask)
    rows = torch.arange(len(texts))
    assert len(rec.hooks) == model.cfg.n_layers
    worst = 0.0
    for h in rec.hooks:
        for j, s in enumerate(SITES):
            ref = cache[h][rows, res.positions[:, j]]
            worst = max(worst, (res.acts[(h, s)] - ref).abs().max().item())
    assert worst <= 1e-5, worst
    for i, r in enumerate(records[:12]):  # the sites are the right words
        act_tok, concl_tok = (
            tok.convert_ids_to_tokens(int(b.tokens[i, p])) for p in res.positions[i]
        )
        nxt = tok.convert_ids_to_tokens(int(b.tokens[i, res.positions[i, 0] + 1]))
        assert act_tok == "act" and nxt == CFG.arm_names[r.action]
        assert concl_tok == CFG.arm_names[r.rationale_arm]
    # The same through the store (length-sorted batches, padded widths): same activations.
    st = record_store(model, fmt, records[:12], "resid_post", SITES, _tmp(), batch_size=5,
                      tokenizer=tok, progress=False)  # fmt: skip
    for h in rec.hooks:
        got, _ = st.load(h, "action")
        assert (got - res.acts[(h, "action")]).abs().max() <= 1e-5


def _tmp():
    import tempfile

    return tempfile.mkdtemp(prefix="kdgap-org-")


def test_labels_table_matches_step_records(faithful, records):
    model, tok = faithful
    st = record_store(model, OrganismFormat(), records, "blocks.3.hook_resid_post", SITES,
                      _tmp(), batch_size=7, seed=3, model_id="organism:faithful",
                      tokenizer=tok, progress=False)  # fmt: skip
    acts, labels = st.load("blocks.3.hook_resid_post", "action")
    assert acts.shape == (len(records), model.cfg.d_model)
    assert labels["example"].tolist() == list(range(len(records)))
    for col in ("episode", "step", "action", "rationale_arm", "ucb_arm", "greedy_arm"):
        assert labels[col].tolist() == [getattr(r, col) for r in records], col
    follows = [r.action == r.rationale_arm for r in records]
    assert labels["action_follows_rationale"].tolist() == follows
    assert (labels["model"] == "organism:faithful").all() and (labels["seed"] == 3).all()
    # Off-policy: the random driver's arms built the histories, so actions vary.
    assert labels["action"].nunique() > 1


def test_record_from_model_plays_and_records(tmp_path):
    st = record_from_model("organism:faithful", episodes=1, seed=0, hooks="resid_post",
                           sites="action,rationale.conclusion", out=tmp_path / "acts",
                           horizon=6, batch_size=4, progress=False)  # fmt: skip
    m = st.manifest
    assert m["model"]["id"] == "organism:faithful" and m["sites"] == SITES
    assert m["model"]["identity"]["driver"] == "random" and len(m["hooks"]) == 4
    acts, labels = st.load("blocks.0.hook_resid_post", "rationale.conclusion")
    assert acts.shape[0] == 6 and labels["step"].tolist() == list(range(6))
    with pytest.raises(ValueError, match="driver='nope'"):
        record_from_model("organism:faithful", episodes=1, seed=0, hooks="resid_post",
                          sites="action", out=tmp_path / "x", driver="nope")  # fmt: skip


def test_transcript_text_never_re_templates_an_agent_prompt(tiny_tokenizer):
    from kdgap.records import StepRecord

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}<bos>{{ m['content'] }}{% endfor %}"
    templated = tok.apply_chat_template(
        [{"role": "user", "content": "Step=0 Action=red Reward=1"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    rec = StepRecord(
        episode=0, step=0, n_arms=5, action=0, reward=1.0, regret=0.0, valid=True, best_arm=0,
        ucb_arms=(0,), greedy_arms=(0,), frequent_arms=(0,), prompt=templated,
        completion=" ACTION=red",
    )  # fmt: skip
    # The agent stored the templated prompt: it is recorded as is, not wrapped twice.
    assert transcript_text(rec) == templated + " ACTION=red"
    assert transcript_text(rec).count("<bos>") == 1
