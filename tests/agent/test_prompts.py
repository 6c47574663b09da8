"""PaperFormat: prompt text, sites (hand-located) and the conclusion edit."""

import pytest

from kdgap.agent.parsing import parse_rationale
from kdgap.agent.prompts import PaperFormat, format_reward
from kdgap.envs import BanditConfig
from kdgap.envs.transcript_format import TranscriptFormat

ARMS = ("red", "green", "blue", "yellow", "orange")
CFG = BanditConfig()


def test_implements_protocol_and_names():
    assert isinstance(PaperFormat(), TranscriptFormat)
    assert PaperFormat().name == "paper" and PaperFormat(knowing_doing=True).name == "paper-ucb"
    assert PaperFormat().action_marker == "ACTION="


@pytest.mark.parametrize(("r", "s"), [(1.0, "1"), (0.0, "0"), (0.3, "0.3"), (-1.254, "-1.25"),
                                      (-0.001, "0"), (2.5, "2.5")])  # fmt: skip
def test_format_reward(r, s):
    assert format_reward(r) == s


def test_prompt_lists_buttons_horizon_history_and_instruction():
    p = PaperFormat().render_prompt(CFG, [1, 2], [0.3, 1.0])
    assert "5 buttons labeled red, green, blue, yellow, orange" in p
    assert "You have 50 time steps" in p and "Bernoulli" in p
    assert "Step=0 Action=green Reward=0.3\nStep=1 Action=blue Reward=1\n" in p
    assert p.endswith("End your answer with ACTION=X, where X is one of: "
                      "red, green, blue, yellow, orange.")  # fmt: skip
    assert "<ucb_values>" not in p
    p0 = PaperFormat().render_prompt(BanditConfig(reward="gaussian", sigma=3.0), [], [])
    assert "not pressed any button yet" in p0 and "standard deviation 3" in p0


def test_knowing_doing_prompt_states_the_configs_ucb_rule():
    p = PaperFormat(knowing_doing=True).render_prompt(CFG, [0], [1.0])
    assert "sqrt(log(t) / N(a))" in p and "c = 0.5" in p and "<ucb_values>" in p
    p1 = PaperFormat(knowing_doing=True).render_prompt(
        BanditConfig(ucb_c=2.0, ucb_bonus="ucb1"), [0], [1.0]
    )
    assert "sqrt(2 * log(t) / N(a))" in p1 and "c = 2" in p1


def test_render_prompt_rejects_bad_history():
    with pytest.raises(ValueError, match="rewards has"):
        PaperFormat().render_prompt(CFG, [0, 1], [1.0])
    with pytest.raises(ValueError, match="outside"):
        PaperFormat().render_prompt(CFG, [7], [1.0])


def test_arm_continuations():
    assert PaperFormat().arm_continuations("red") == ["red", " red", "Red", " Red"]
    assert PaperFormat().arm_continuations("3") == ["3", " 3"]


def test_site_spans_hand_located():
    fmt = PaperFormat(knowing_doing=True)
    prompt = "<bos>User: " + fmt.render_prompt(CFG, [0, 1], [1.0, 0.0]) + "\nAssistant:"
    comp = " <ucb_values>\nred: 1.2\ngreen: 0.4\n</ucb_values> so red. ACTION=red"
    text = prompt + comp
    spans = fmt.site_spans(text)
    end = prompt.rindex("orange.") + len("orange.")
    assert spans["prompt.end"] == (end - 1, end)
    assert text[slice(*spans["history.last"])] == "Step=1 Action=green Reward=0"
    a = text.rindex("ACTION=") + len("ACTION=")
    assert spans["action"] == (a - 1, a) and text[a - 1] == "="
    assert text[slice(*spans["rationale.arm[red]"])] == "red: 1.2"
    assert text[slice(*spans["rationale.arm[green]"])] == "green: 0.4"
    assert spans["rationale.conclusion"] == spans["rationale.arm[red]"]
    assert set(spans) == {"prompt.end", "history.last", "action", "rationale.arm[red]",
                          "rationale.arm[green]", "rationale.conclusion"}  # fmt: skip


def test_site_spans_ignore_the_prompts_own_marker_and_tags():
    fmt = PaperFormat(knowing_doing=True)
    text = fmt.render_prompt(CFG, [], []) + "\nI am not sure."
    spans = fmt.site_spans(text)
    assert "action" not in spans and "history.last" not in spans
    assert not any(k.startswith("rationale") for k in spans)


def test_edit_conclusion_swaps_values_and_closing_mention():
    fmt = PaperFormat(knowing_doing=True)
    comp = "<ucb_values>\nred: 1.2\ngreen: 0.4\nblue: 0.9\n</ucb_values>\nRed is best, press red."
    out = fmt.edit_conclusion(comp, 1, ARMS)
    assert (
        out == "<ucb_values>\nred: 0.4\ngreen: 1.2\nblue: 0.9\n</ucb_values>\n"
        "Green is best, press green."
    )
    assert parse_rationale(out, ARMS) == 1
    assert fmt.edit_conclusion(comp, 0, ARMS) == comp  # already the conclusion


def test_edit_conclusion_breaks_ties_at_the_top():
    fmt = PaperFormat(knowing_doing=True)
    comp = "<ucb_values>red: inf, green: inf, blue: 0.3</ucb_values>"
    # blue below the top: blue takes inf; red and green get blue's old value.
    assert (
        fmt.edit_conclusion(comp, 2, ARMS)
        == "<ucb_values>red: 0.3, green: 0.3, blue: inf</ucb_values>"
    )
    # green tied at the top: the lower-index tie (red) gets the best value below the top.
    out = fmt.edit_conclusion(comp, 1, ARMS)
    assert out == "<ucb_values>red: 0.3, green: inf, blue: 0.3</ucb_values>"
    assert parse_rationale(out, ARMS) == 1


def test_edit_conclusion_errors_name_the_problem():
    fmt = PaperFormat(knowing_doing=True)
    with pytest.raises(ValueError, match="no parsable"):
        fmt.edit_conclusion("no block", 1, ARMS)
    with pytest.raises(ValueError, match="has no entry"):
        fmt.edit_conclusion("<ucb_values>red: 1, green: 0</ucb_values>", 3, ARMS)
    with pytest.raises(ValueError, match="every"):
        fmt.edit_conclusion("<ucb_values>red: inf, green: inf</ucb_values>", 1, ARMS)
    with pytest.raises(ValueError, match="new_arm=9"):
        fmt.edit_conclusion("<ucb_values>red: 1</ucb_values>", 9, ARMS)


def test_parse_history_inverts_render_prompt_also_inside_a_chat_template():
    cfg = BanditConfig(n_arms=5, horizon=10, reward="gaussian")
    acts, rews = [3, 0, 3, 4], [0.25, -1.5, 2.0, 0.0]
    fmt = PaperFormat(knowing_doing=True)
    prompt = fmt.render_prompt(cfg, acts, rews)
    assert fmt.parse_history(prompt, cfg.arm_names) == (acts, rews)
    templated = "<bos>user: " + prompt + "<eos><bos>assistant:"
    assert fmt.parse_history(templated, cfg.arm_names) == (acts, rews)
    assert fmt.parse_history(fmt.render_prompt(cfg, [], []), cfg.arm_names) == ([], [])


def test_parse_history_refuses_other_prompts_and_arms():
    cfg = BanditConfig(n_arms=5, horizon=10)
    fmt = PaperFormat()
    with pytest.raises(ValueError, match="not a paper-format prompt"):
        fmt.parse_history("red1 green0 think", cfg.arm_names)
    prompt = fmt.render_prompt(cfg, [0, 1], [1, 0])
    with pytest.raises(ValueError, match="arm from"):
        fmt.parse_history(prompt, ("a", "b", "c", "d", "e"))


def test_write_rationale_hand_computed():
    # t = 3 pulls; red: N=2, mean 0.5 -> 0.5 + 0.5 * sqrt(ln 3 / 2) = 0.8706;
    # green: N=1, mean 1 -> 1 + 0.5 * sqrt(ln 3) = 1.5241; blue, yellow, orange untried.
    cfg = BanditConfig(n_arms=5, horizon=10)
    fmt = PaperFormat(knowing_doing=True)
    text = fmt.write_rationale(cfg, [0, 0, 1], [1, 0, 1])
    assert text == (
        "<ucb_values>\nred: 0.87\ngreen: 1.52\nblue: inf\nyellow: inf\norange: inf\n</ucb_values>\n"
    )
    assert fmt.parse_rationale(text, cfg.arm_names) == 2  # ties at inf: the lowest arm
    tried = fmt.write_rationale(cfg, [0, 0, 1, 2, 3, 4], [1, 0, 1, 0, 0, 0])
    assert fmt.parse_rationale(tried, cfg.arm_names) == 1  # green has the highest UCB
    with pytest.raises(ValueError, match="knowing_doing=True"):
        PaperFormat().write_rationale(cfg, [0], [1])


def test_write_rationale_adds_decimals_where_rounding_would_change_the_conclusion():
    # Gaussian rewards, one pull each, t = 2: UCB = reward + 0.5 * sqrt(ln 2) = reward +
    # 0.41628; red 0.88628, green 0.89028 both read "0.89" at two decimals (a tie the
    # lowest arm, red, would win), so four decimals are written and green stays on top.
    cfg = BanditConfig(n_arms=2, horizon=10, reward="gaussian")
    fmt = PaperFormat(knowing_doing=True)
    text = fmt.write_rationale(cfg, [0, 1], [0.47, 0.474])
    assert fmt.parse_rationale(text, cfg.arm_names) == 1
    assert "red: 0.8863\n" in text and "green: 0.8903\n" in text
