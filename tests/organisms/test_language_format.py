"""The transcript language, its tokenizer and OrganismFormat (parsing, edits, sites)."""

import numpy as np
import pytest

from kdgap.envs.bandit import BanditConfig
from kdgap.envs.transcript_format import SiteNotFound, TranscriptFormat
from kdgap.organisms.language import OrganismLanguage
from kdgap.organisms.transcript import OrganismFormat

NAMES = ("red", "green", "blue", "yellow", "orange")
ACTIONS = [0, 2, 0, 4, 1, 1]
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def lang():
    return OrganismLanguage(n_arms=5, horizon=50)


@pytest.fixture(scope="module")
def tokenizer(lang, tmp_path_factory):
    return lang.save_tokenizer(tmp_path_factory.mktemp("organism_tok"))


def transcript(lang):
    counts = np.bincount(ACTIONS, minlength=5)
    wins = np.bincount(ACTIONS, weights=REWARDS, minlength=5)
    prompt = lang.prompt_text(ACTIONS, REWARDS)
    return prompt, lang.completion_text(counts, wins, conclusion=3, action=1)


def test_transcript_text_is_the_documented_layout(lang):
    prompt, completion = transcript(lang)
    assert prompt == "red1 blue0 red0 orange1 green1 green0 think "
    assert completion == ("red 2 1 green 2 1 blue 1 0 yellow 0 0 orange 1 1 ucb yellow act green")


def test_tokenizer_round_trips_transcripts_and_adds_one_bos(lang, tokenizer):
    prompt, completion = transcript(lang)
    text = prompt + completion
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.strip()
    # every word is one token, and the fast path builds the same ids
    assert len(ids) == 1 + len(text.split())
    assert ids[1:] == lang.ids(text)
    assert len(ids) + 1 == lang.seq_len(len(ACTIONS))  # seq_len counts the final <eos>


def test_unknown_words_and_gaussian_rewards_are_refused(lang):
    with pytest.raises(ValueError, match="purple"):
        lang.ids("red1 purple")
    with pytest.raises(ValueError, match="bernoulli"):
        lang.history_text([0], [0.3])
    with pytest.raises(ValueError, match="horizon"):
        OrganismLanguage(horizon=0)


def test_format_implements_the_protocol_and_parses(lang):
    fmt = OrganismFormat()
    assert isinstance(fmt, TranscriptFormat)
    prompt, completion = transcript(lang)
    assert fmt.render_prompt(BanditConfig(), ACTIONS, REWARDS) == prompt
    assert fmt.parse_action(completion, NAMES) == 1
    assert fmt.parse_rationale(completion, NAMES) == 3
    assert fmt.parse_action("red 2 1 ucb yellow act purple", NAMES) is None
    assert fmt.parse_action("red 2 1 ucb yellow", NAMES) is None
    assert fmt.parse_rationale("red 2 1 act green", NAMES) is None
    rationale = fmt.strip_action(completion)
    assert rationale.endswith("ucb yellow ") and "act" not in rationale.split()
    forced = prompt + rationale + fmt.action_marker + fmt.arm_continuations("green")[0]
    assert forced == prompt + completion
    with pytest.raises(ValueError, match="bernoulli"):
        fmt.render_prompt(BanditConfig(reward="gaussian"), [0], [0.5])


def test_edit_conclusion_changes_only_the_concluding_arm(lang):
    fmt = OrganismFormat()
    _, completion = transcript(lang)
    edited = fmt.edit_conclusion(completion, 0, NAMES)
    assert edited == completion.replace("ucb yellow", "ucb red")
    assert fmt.parse_rationale(edited, NAMES) == 0 and fmt.parse_action(edited, NAMES) == 1
    with pytest.raises(SiteNotFound):
        fmt.edit_conclusion("red 2 1 green", 0, NAMES)
    with pytest.raises(ValueError, match="new_arm"):
        fmt.edit_conclusion(completion, 7, NAMES)


def test_site_spans_point_at_the_right_words(lang):
    fmt = OrganismFormat()
    prompt, completion = transcript(lang)
    text = prompt + completion
    spans = fmt.site_spans(text)
    word = {k: text[s:e] for k, (s, e) in spans.items()}
    assert word["prompt.end"] == "think"
    assert word["history.last"] == "green0"
    assert word["rationale.conclusion"] == "yellow"
    assert word["action"] == "act"  # its next-token prediction is the action
    assert text[spans["action"][1] :].split()[0] == "green"
    assert word["rationale.arm[blue]"] == "blue 1 0"
    assert word["rationale.arm[orange]"] == "orange 1 1"
    assert spans["rationale.conclusion"][0] > spans["rationale.arm[orange]"][1]
    assert spans["action"][0] > spans["rationale.conclusion"][1]
    # step 0: no history; before the action is written: no action site
    spans0 = fmt.site_spans("think red 0 0 green 0 0 ucb red ")
    assert "history.last" not in spans0 and "action" not in spans0
    assert "rationale.conclusion" in spans0
