"""The Alice-in-Wonderland study: parsers on hand-written completions, the study end to end
on a tiny random chat model."""

from __future__ import annotations

import math

import pytest

from kdgap.agent import generation
from kdgap.report import aiw
from kdgap.report.aiw import (
    PROMPT_TYPES,
    VARIATIONS,
    aiw_study,
    correct_answer,
    parse_answer,
    rationale_consistent,
    rationale_number,
    render_prompt,
    score_completion,
    standard_error,
    summarise,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant:{% endif %}"
)


def test_variations_and_targets():
    assert VARIATIONS == ((3, 6), (4, 2), (1, 4), (4, 1))
    assert [correct_answer(n, m) for n, m in VARIATIONS] == [7, 3, 5, 2]


@pytest.mark.parametrize("pt", PROMPT_TYPES)
def test_prompts_name_the_numbers_and_the_answer_form(pt):
    text = render_prompt(3, 6, pt)
    assert text.startswith("Alice has 3 brothers and she also has 6 sisters.")
    assert "How many sisters does Alice's brother have?" in text
    assert '"### Answer: "' in text
    assert ("double check" in text) == (pt == "THINKING")
    assert ("DO NOT OUTPUT ANY TEXT" in text) == (pt == "RESTRICTED")


def test_prompt_errors_name_the_parameter():
    with pytest.raises(ValueError, match="prompt_type='COT'.*STANDARD"):
        render_prompt(3, 6, "COT")
    with pytest.raises(ValueError, match=r"n=-1 must be an integer >= 0\."):
        render_prompt(-1, 6, "STANDARD")


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("### Answer: 7", 7),
        ("Each brother has 6 + 1 = 7 sisters.\n### Answer: 7", 7),
        ("### Answer: **3**", 3),
        ("## answer: seven", 7),
        ('### Answer: "5"', 5),
        ("### Answer: 2.5 sisters", 2.5),
        ("### Answer: 6\nWait, I made a mistake.\n### Answer: 7", 7),  # last line wins
        ("The answer is 7.", None),  # no answer line
        ("Answer: 7", None),  # the form needs the '#'
        ("### Answer: many", None),
        ("", None),
    ],
)
def test_parse_answer(text, answer):
    assert parse_answer(text) == answer


def test_rationale_number_is_the_last_number_before_the_answer_line():
    text = "Alice has 3 brothers and 6 sisters. 3 * 6 = 18.\n### Answer: 18"
    assert rationale_number(text) == 18 and rationale_consistent(text) is True
    wrong = "She has 6 sisters, plus Alice makes 7.\n### Answer: 6"
    assert rationale_number(wrong) == 7 and rationale_consistent(wrong) is False
    # numbers after the answer line are not the reasoning; decimals and ids are read whole
    assert rationale_number("x is 2.5\n### Answer: 3\nthen 9") == 2.5
    assert rationale_number("brother_2 has 4 sisters\n### Answer: 4") == 4
    assert rationale_number("### Answer: 7") is None  # RESTRICTED: nothing before
    assert rationale_consistent("### Answer: 7") is None
    assert rationale_number("no answer line, 7") is None


def test_score_completion_and_summary():
    rows = [
        score_completion(3, 6, "STANDARD", 0, "6 sisters + Alice = 7\n### Answer: 7"),
        score_completion(3, 6, "STANDARD", 1, "3 * 6 = 18\n### Answer: 18"),  # confabulation
        score_completion(3, 6, "STANDARD", 2, "so 7 in total\n### Answer: 6"),  # disconnected
        score_completion(4, 1, "STANDARD", 0, "I do not know."),  # unparsed: wrong
        score_completion(4, 1, "RESTRICTED", 0, "### Answer: 2"),
    ]
    assert [r.correct for r in rows] == [True, False, False, False, True]
    assert rows[1].target == 7 and rows[1].answer == 18
    s = summarise(rows)
    assert list(s) == ["STANDARD", "RESTRICTED"]
    std = s["STANDARD"]
    assert (std["n"], std["n_correct"]) == (4, 1)
    assert std["correct_rate"] == 0.25
    assert std["se"] == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    assert std["parsed_rate"] == 0.75
    assert std["n_checked"] == 3
    assert std["rationale_matches_answer"] == pytest.approx(2 / 3)
    assert (std["confabulated"], std["disconnected"]) == (1, 1)
    assert list(std["by_variation"]) == ["3,6->7", "4,1->2"]
    assert std["by_variation"]["3,6->7"]["correct_rate"] == pytest.approx(1 / 3)
    res = s["RESTRICTED"]
    assert (res["correct_rate"], res["se"], res["rationale_matches_answer"]) == (1.0, 0.0, None)


def test_standard_error():
    assert standard_error(0.5, 100) == pytest.approx(0.05)
    assert standard_error(0.0, 8) == 0.0
    with pytest.raises(ValueError, match="n=0"):
        standard_error(0.5, 0)
    with pytest.raises(ValueError, match="p=1.5"):
        standard_error(1.5, 4)


# ---------------------------------------------------------------- the study, tiny model
@pytest.fixture(scope="module")
def chat_bridge(tiny_hf_dir):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_dir)
    bridge = TransformerBridge.boot_transformers(str(tiny_hf_dir), hf_model=hf, tokenizer=tok)
    # the bridge normalises (re-creates) the tokenizer: set the template on its own copy
    bridge.tokenizer.chat_template = CHAT_TEMPLATE
    return bridge.eval()


def test_study_end_to_end_on_a_tiny_model(chat_bridge):
    kw = dict(variations=VARIATIONS[:2], n_samples=3, temperature=1.0, max_new_tokens=6, seed=3)
    res = aiw_study(chat_bridge, **kw)
    assert len(res.samples) == 3 * 2 * 3
    assert [s.prompt_type for s in res.samples[::6]] == list(PROMPT_TYPES)
    assert {(s.n, s.m, s.target) for s in res.samples} == {(3, 6, 7), (4, 2, 3)}
    assert res.config["max_new_tokens"] == {pt: 6 for pt in PROMPT_TYPES}
    for pt in PROMPT_TYPES:
        e = res.summary[pt]
        assert e["n"] == 6 and 0.0 <= e["correct_rate"] <= 1.0
        assert e["se"] == pytest.approx(standard_error(e["correct_rate"], 6))
        assert set(e["by_variation"]) == {"3,6->7", "4,2->3"}
    for s in res.samples:
        assert "<eos>" not in s.completion and "<bos>" not in s.completion
        assert s.answer == parse_answer(s.completion)
    # temperature sampling: repeated samples of one prompt differ; the seed reproduces them
    texts = [s.completion for s in res.samples]
    assert len(set(texts[:3])) > 1
    again = aiw_study(chat_bridge, **kw)
    assert [s.completion for s in again.samples] == texts
    d = res.to_dict()
    assert len(d["samples"]) == 18 and "samples" not in res.to_dict(with_samples=False)


def test_study_scores_a_model_that_answers_right(chat_bridge, monkeypatch):
    """The study wiring: a generator that always writes the right answer scores 100%."""

    def fake(model, prompts, **kw):
        outs = []
        for p in prompts:
            m = int(p.split("also has ")[1].split()[0])
            outs.append(f"{m} sisters plus Alice: {m + 1}\n### Answer: {m + 1}<eos>")
        return generation.Generation(outs, [[] for _ in outs], None)

    monkeypatch.setattr(aiw, "generate", fake)
    res = aiw_study(chat_bridge, n_samples=2)
    for pt in PROMPT_TYPES:
        assert res.summary[pt]["correct_rate"] == 1.0 and res.summary[pt]["se"] == 0.0
        assert res.summary[pt]["rationale_matches_answer"] == 1.0


def test_study_errors(chat_bridge, tiny_hf_bridge):
    with pytest.raises(ValueError, match="no chat template.*chat_template=False"):
        aiw_study(tiny_hf_bridge, n_samples=1)
    with pytest.raises(ValueError, match="n_samples=0"):
        aiw_study(chat_bridge, n_samples=0)
    with pytest.raises(ValueError, match="prompt_types=.*'COT'"):
        aiw_study(chat_bridge, prompt_types=["COT"])
    res = aiw_study(
        tiny_hf_bridge, chat_template=False, variations=[(1, 4)], prompt_types=["RESTRICTED"],
        n_samples=1, max_new_tokens=3,
    )  # fmt: skip
    assert res.config["chat_template"] is False and len(res.samples) == 1
    assert aiw.DEFAULT_MAX_NEW_TOKENS["RESTRICTED"] < aiw.DEFAULT_MAX_NEW_TOKENS["STANDARD"]
