"""The model session: one load and one format, and the same agents, transcripts and stores
as the pieces it replaces (load_organism + OrganismFormat + TextAgent + play + record_store)."""

from __future__ import annotations

import pytest
import torch

from kdgap.agent.prompts import PaperFormat
from kdgap.agent.text_agent import TextAgent
from kdgap.envs import BanditConfig
from kdgap.hooks import record_store
from kdgap.organisms import load_organism
from kdgap.organisms.transcript import OrganismFormat
from kdgap.policies.play import play
from kdgap.policies.reference import make_policy
from kdgap.report import session as session_module
from kdgap.report.pipeline import Analysis, AnalyzeConfig
from kdgap.report.session import Session, driver_policy, make_agent

CFG = BanditConfig(horizon=6)
HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def faithful():
    return Session("organism:faithful")


def test_the_model_is_loaded_once_with_its_format(faithful):
    assert isinstance(faithful.fmt, OrganismFormat)
    assert faithful.bridge is faithful.loaded.bridge
    assert faithful.tokenizer is faithful.loaded.tokenizer
    assert faithful.model_id == "organism:faithful"
    assert faithful.identity["source"] == "organism" and "load_seconds" not in faithful.identity
    assert "loaded" not in repr(faithful)


def test_a_chat_free_model_gets_the_raw_paper_prompt(tiny_hf_dir):
    s = Session(str(tiny_hf_dir), knowing_doing=False)
    assert isinstance(s.fmt, PaperFormat)
    assert s.fmt.use_chat_template is False and s.fmt.knowing_doing is False


def test_agent_settings_reach_the_text_agent(faithful):
    a = faithful.agent(mode="free", counterfactual=True, max_new_tokens=7, temperature=0.5,
                       seed=3, batch_size=2)  # fmt: skip
    assert (a.mode, a.counterfactual, a.max_new_tokens, a.temperature, a.seed, a.batch_size) == (
        "free", True, 7, 0.5, 3, 2,
    )  # fmt: skip
    assert a.model is faithful.bridge and a.fmt is faithful.fmt
    assert (
        faithful.agent().max_new_tokens == TextAgent(faithful.bridge, faithful.fmt).max_new_tokens
    )


def test_make_agent_is_a_session_agent():
    a = make_agent("organism:faithful", seed=4, counterfactual=True)
    assert isinstance(a, TextAgent) and isinstance(a.fmt, OrganismFormat)
    assert (a.mode, a.seed, a.counterfactual) == ("forced", 4, True)


def test_off_policy_play_equals_the_pieces(faithful):
    model, _ = load_organism("faithful")
    agent = TextAgent(model, OrganismFormat(), seed=2)
    want = play(agent, CFG, n_episodes=3, seed=2, driver=make_policy("random"), progress=False)
    got = faithful.play(CFG, 3, seed=2, driver="random", progress=False)
    assert got == want and len(got) == 3 * CFG.horizon
    assert any(r.executed_action != r.action for r in got)  # the driver built the history
    own = faithful.play(CFG, 2, seed=2, driver="own", progress=False)
    assert own == faithful.play(CFG, 2, seed=2, progress=False)
    assert all(r.executed_action is None for r in own)


def test_driver_names(faithful):
    assert driver_policy(None) is None and driver_policy("own") is None
    ucb = make_policy("ucb")
    assert driver_policy(ucb) is ucb and driver_policy("random").name == "random"
    with pytest.raises(ValueError, match="driver='nope'.*driver='own'"):
        faithful.play(CFG, 1, driver="nope")


def test_record_fills_in_the_model_and_equals_record_store(faithful, tmp_path):
    records = faithful.play(CFG, 2, seed=1, driver="random", progress=False)
    store = faithful.record(records, "resid_post", "action", tmp_path / "s", seed=1,
                            provenance={"driver": "random"}, progress=False)  # fmt: skip
    m = store.manifest
    assert m["model"]["id"] == "organism:faithful"
    assert m["model"]["identity"]["driver"] == "random"
    assert m["model"]["identity"]["spec"] == "organism:faithful"
    model, _ = load_organism("faithful")
    ref = record_store(model, OrganismFormat(), records, "resid_post", "action", tmp_path / "r",
                       model_id="organism:faithful", seed=1, progress=False)  # fmt: skip
    got, labels = store.load(hook=HOOK, site="action")
    want, want_labels = ref.load(hook=HOOK, site="action")
    assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))
    assert labels.equals(want_labels)


def test_analysis_loads_its_session_lazily_or_takes_one(faithful, tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("constructing an analysis loaded a model")

    monkeypatch.setattr(session_module, "load_model", no_model)
    lazy = Analysis("organism:faithful", tmp_path, AnalyzeConfig())
    assert lazy.bandit == BanditConfig(horizon=50)
    given = Analysis("organism:faithful", tmp_path, AnalyzeConfig(), session=faithful)
    assert given.session is faithful
    with pytest.raises(AssertionError, match="loaded a model"):
        lazy.session  # noqa: B018 - the first use loads
