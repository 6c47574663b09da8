"""``analyze`` on a model that is not an organism: a tiny random chat Llama saved as a local
Hugging Face folder, in the paper's prompt behind a chat template.

With a scripted rationale (kdgap writes the correct UCB rationale, the model only acts)
every stage runs, patching included: the pairs are read back from paper-format prompts and
chat-templated as the agent played them. With its own rationale a random model writes
nothing parsable, and the analysis still completes, saying which measurements were not
possible and why.
"""

from __future__ import annotations

import json

import pytest
import torch

from kdgap.agent.prompts import PaperFormat
from kdgap.agent.text_agent import TextAgent
from kdgap.envs import BanditConfig
from kdgap.report.pipeline import AnalyzeConfig, analyze
from kdgap.report.session import Session

SMALL = dict(episodes=2, horizon=12, record_episodes=8, n_pairs=8, freqbias_histories=2,
             decomposition_steps=12)  # fmt: skip


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory, paper_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_tok = paper_tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        initializer_range=0.3, bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("chat_llama")
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    hf_tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def scripted(chat_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("scripted")
    summary = analyze([chat_llama], out, AnalyzeConfig(**SMALL, rationale="scripted"),
                      progress=False)  # fmt: skip
    return out, summary["models"][chat_llama], summary


def test_scripted_rationale_gives_every_measurement(scripted, chat_llama):
    out, entry, summary = scripted
    assert summary["config"]["rationale"] == "scripted"
    # kdgap wrote the rationale: it is the UCB arm on every step, and always parsed.
    assert entry["behavior"]["rationale_correct"] == 1.0
    assert entry["probes"]["unavailable"] is None and entry["probes"]["layers"] == [0, 1]
    pt = entry["patching"]
    assert pt["unavailable"] is None and pt["n_pairs"] >= 1
    assert len(pt["layer_profile"]) == 2 and pt["mediated_fraction"] == pt["mediated_fraction"]
    # The pairs were chat-templated as the agent played: the heatmap's tokens show it.
    assert pt["heatmap"] is not None and "<bos>" in pt["heatmap"]["tokens"][0]
    # kdgap's rationale under each edited history is written too, so the decomposition and
    # the battery run on a model that writes no usable rationale of its own.
    dec, battery = entry["decomposition"], entry["battery"]
    assert dec["unavailable"] is None and dec["n_steps"] >= 1 and dec["planted"] is None
    assert 0.0 <= dec["reading_share"] <= 1.0 and battery["n_steps"] >= 1
    assert (out / "report.html").exists()


def test_scripted_transcripts_hold_the_rationale_and_the_models_choice(scripted, chat_llama):
    out, _, _ = scripted
    slug = next((out / "models").iterdir())
    rows = [json.loads(line) for line in (slug / "transcripts.jsonl").read_text().splitlines()]
    assert rows and all(r["completion"].startswith("<ucb_values>\n") for r in rows)
    assert all(r["prompt"].startswith("<bos>user: You are in a room") for r in rows)
    assert all(r["rationale_arm"] == r["ucb_arms"][0] for r in rows)  # the UCB arm, always


def test_own_rationale_of_a_random_model_is_reported_unavailable(chat_llama, tmp_path):
    summary = analyze([chat_llama], tmp_path, AnalyzeConfig(**SMALL), progress=False)
    entry = summary["models"][chat_llama]
    assert entry["behavior"]["rationale_correct"] == 0.0  # nothing parsable was written
    assert "rationale" in entry["probes"]["unavailable"]
    latent = entry["probes"]["latent"]  # needs no rationale: measured all the same
    assert latent["layers"] == [0, 1] and set(latent["accuracy"]) == {
        "ucb_arm", "greedy_arm", "frequent_arm",
    }  # fmt: skip
    why = entry["patching"]["unavailable"]
    assert "transcripts has a parsable rationale" in why and "--rationale scripted" in why
    assert entry["patching"]["mediated_fraction"] is None
    page = (tmp_path / "report.html").read_text()
    assert "Not measured:" in page and "transcripts has a parsable rationale" in page


def test_scripted_rationale_needs_forced_choice_and_the_paper_format(chat_llama):
    session = Session(chat_llama)
    with pytest.raises(ValueError, match="mode='forced'"):
        TextAgent(session.bridge, session.fmt, mode="free", rationale="scripted")
    with pytest.raises(ValueError, match=r"PaperFormat\(knowing_doing=True\)"):
        TextAgent(session.bridge, PaperFormat(), rationale="scripted")
    with pytest.raises(ValueError, match="rationale='mine'"):
        AnalyzeConfig(rationale="mine")


def test_scripted_agent_acts_after_the_written_rationale(chat_llama):
    session = Session(chat_llama, rationale="scripted")
    cfg = BanditConfig(horizon=4)
    records = session.play(cfg, 2, seed=1, progress=False)
    fmt = session.fmt
    for r in records:
        want = fmt.write_rationale(cfg, *fmt.parse_history(r.prompt, cfg.arm_names))
        assert r.completion.startswith(want + fmt.action_marker)
        assert r.completion[len(want + fmt.action_marker) :] in fmt.arm_continuations(
            cfg.arm_names[r.action]
        )


@pytest.mark.parametrize(("name", "follows"), [("faithful", True), ("greedy-bypass", False)])
def test_organisms_given_the_correct_rationale_act_as_planted(name, follows):
    # Planted truth: faithful acts on the rationale it reads, greedy-bypass acts greedily
    # whatever the rationale says (kdgap.organisms.mechanisms).
    session = Session(f"organism:{name}", rationale="scripted")
    records = session.play(BanditConfig(horizon=30), 4, seed=2, progress=False)
    on_rationale = sum(r.action == r.rationale_arm for r in records) / len(records)
    greedy = sum(r.action in r.greedy_arms for r in records) / len(records)
    assert all(r.rationale_arm == r.ucb_arms[0] for r in records)
    if follows:
        assert on_rationale >= 0.95
    else:
        assert greedy >= 0.95 and on_rationale < 0.8


def test_latent_knowledge_is_measured_without_a_rationale_and_finds_a_planted_arm(tmp_path):
    # The random chat model wrote no rationale; its latent probes still ran (see the other
    # test). Here the planted case: the faithful organism computes the UCB arm internally
    # (its rationale is right on ~92% of steps), so the UCB arm is decodable at the action
    # site well above chance at its best layer.
    cfg = AnalyzeConfig(episodes=2, horizon=20, record_episodes=24, n_pairs=4,
                        freqbias_histories=1, decomposition_steps=16)  # fmt: skip
    entry = analyze(["organism:faithful"], tmp_path, cfg, progress=False)["models"][
        "organism:faithful"
    ]
    latent = entry["probes"]["latent"]
    assert latent["unavailable"]["ucb_arm"] is None and latent["layers"] == [0, 1, 2, 3]
    assert max(latent["accuracy"]["ucb_arm"]) >= latent["chance"]["ucb_arm"] + 0.3
