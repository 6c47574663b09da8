"""Thought cloning on an organism with a planted gap, resuming, and corrupt checkpoints.

``seed-calibrated`` writes a correct rationale on most steps and then acts greedily on
most of them (the Gemma2-27B-like matrix): on the UCB expert's histories its action is the
expert's on well under 0.6 of the steps. Thought cloning (the UCB rationale and the UCB
arm as targets) must raise that to 0.8 or more within a CI-sized budget: a perfect clone
scores 1.0 (the target arm is the rationale's, ties broken as the expert breaks them),
and 0.8 leaves room for the steps a short run has not learnt while staying far above
the start.
"""

from __future__ import annotations

import pytest

from kdgap.report.session import Session
from kdgap.training import CheckpointError, CloneConfig, clone, expert_examples
from kdgap.training import cloning as cloning_mod

SMALL = dict(episodes=8, horizon=20, updates=40, batch_size=16, lr=1e-3, eval_every=40,
             eval_episodes=4, ckpt_every=20)  # fmt: skip


def _agent():
    return Session("organism:seed-calibrated").agent(seed=0)


@pytest.fixture(scope="module")
def cloned(tmp_path_factory):
    out = tmp_path_factory.mktemp("tc")
    return out, clone(_agent(), CloneConfig(**SMALL), out, progress=False)


def test_thought_cloning_makes_the_gap_organism_act_as_the_expert(cloned):
    _, state = cloned
    start, end = (
        state["curves"]["action_matches_expert"][0],
        state["curves"]["action_matches_expert"][-1],
    )
    assert start < 0.6 and end >= 0.8, (start, end)
    loss = state["curves"]["loss"]
    assert len(loss) == SMALL["updates"] and sum(loss[-5:]) < sum(loss[:5])


def test_targets_are_the_expert_rationale_and_arm():
    agent = _agent()
    from kdgap.envs.bandit import BanditConfig

    cfg = BanditConfig(horizon=4)
    thought = expert_examples(agent, cfg, 1, seed=0, rationale=True)
    action = expert_examples(agent, cfg, 1, seed=0, rationale=False)
    assert [p for p, _ in thought] == [p for p, _ in action] and len(thought) == 4
    for (_, t), (_, a) in zip(thought, action):
        arm = agent.fmt.parse_rationale(t, cfg.arm_names)
        assert a == agent.fmt.action_marker + agent.fmt.arm_continuations(cfg.arm_names[arm])[0]
        assert t.endswith(a) and len(t) > len(a)


def test_a_killed_run_resumes_to_the_same_curves(cloned, tmp_path, monkeypatch):
    _, want = cloned
    real = cloning_mod.save_checkpoint

    def save_then_die(folder, model, opt, state):
        real(folder, model, opt, state)
        raise KeyboardInterrupt  # killed just after the first checkpoint

    monkeypatch.setattr(cloning_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        clone(_agent(), CloneConfig(**SMALL), tmp_path, progress=False)
    monkeypatch.setattr(cloning_mod, "save_checkpoint", real)
    got = clone(_agent(), CloneConfig(**SMALL), tmp_path, progress=False)  # a fresh process
    assert got["curves"] == want["curves"]


def test_a_corrupt_checkpoint_is_a_one_line_error(cloned, tmp_path):
    import shutil

    src, _ = cloned
    shutil.copytree(src, tmp_path / "run")
    weights = tmp_path / "run" / "checkpoint" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights.safetensors does not match") as err:
        clone(_agent(), CloneConfig(**SMALL), tmp_path / "run", progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="other settings"):
        clone(_agent(), CloneConfig(**{**SMALL, "lr": 5e-4}), src, progress=False)
