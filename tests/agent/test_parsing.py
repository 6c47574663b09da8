"""Action and rationale parsers: every rule of kdgap.agent.parsing, hand-checked."""

import math

import pytest

from kdgap.agent.parsing import (
    parse_action,
    parse_rationale,
    parse_ucb_values,
    strip_action,
    top_entry,
)

ARMS = ("red", "green", "blue", "yellow", "orange")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I think blue. ACTION=blue", 2),
        ("ACTION=red then reconsider... ACTION=green", 1),  # several matches: last wins
        ("ACTION=RED", 0),  # wrong case
        ("ACTION=Yellow\n", 3),
        ("ACTION= **Red**.", 0),  # markdown and punctuation
        ('ACTION="orange"!', 4),
        ("ACTION = `blue`", 2),  # spaces around '='
        ("ACTION=purple", None),  # unknown arm
        ("ACTION=X", None),  # the instruction's placeholder echoed
        ("ACTION=red ... ACTION=magenta", None),  # last match invalid: no fallback
        ("ACTION=redish", None),  # a longer word is not the arm
        ("I would press green.", None),  # no match at all
        ("", None),  # empty generation
        ("Step=3 Action=green Reward=1", None),  # an echoed history line is not an action
        ("ACTION=", None),  # marker with nothing after it
    ],
)
def test_parse_action(text, expected):
    assert parse_action(text, ARMS) == expected


def test_parse_action_number_arms_match_whole_numbers():
    names = tuple(str(i + 1) for i in range(10))
    assert parse_action("ACTION=10", names) == 9
    assert parse_action("ACTION=1.", names) == 0
    assert parse_action("ACTION=11", names) is None


def test_parse_action_rejects_bad_arm_names():
    with pytest.raises(ValueError, match="arm_names"):
        parse_action("ACTION=red", [])
    with pytest.raises(ValueError, match="repeat"):
        parse_action("ACTION=red", ["red", "Red"])


def test_strip_action_cuts_before_last_marker():
    assert strip_action("think ACTION=red more ACTION=blue") == "think ACTION=red more "
    assert strip_action("no marker") == "no marker"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<ucb_values>\nred: 0.71\ngreen: 0.52\n</ucb_values>", 0),
        ("<ucb_values>red: 0.71, green: 0.92, blue: 0.1</ucb_values>", 1),
        ("<ucb_values>\nred = 0.3\nblue = 0.8\n</ucb_values>", 2),
        (
            "<ucb_values>UCB(red) = 0.5 + 0.5*sqrt(log(4)/2) = 0.92; "
            "UCB(yellow) = 1.1</ucb_values>",
            3,
        ),
        ("<ucb_values>\n- **Red**: 0.4\n- **Orange**: inf\n</ucb_values>", 4),
        ("<ucb_values>\n1. red: 0.2\n2. green: 0.3\n</ucb_values>", 1),  # enumerated list
        ("<ucb_values>red: infinity, green: ∞</ucb_values>", 0),  # tie: lowest arm index
        ("<ucb_values>blue: 0.5, red: 0.5</ucb_values>", 0),  # tie: lowest arm index
        ("<ucb_values>red: 0.9</ucb_values> later <ucb_values>green: 0.2</ucb_values>", 1),
        ("<ucb_values>red: 0.1</ucb_values> <ucb_values>none here</ucb_values>", 0),
        ("<ucb_values>\nred: 0.2\nblue: 0.6", 2),  # unclosed (cut at the action marker)
        ("<ucb_values>red: n/a, purple: 0.9</ucb_values>", None),  # nothing parsable
        ("red: 0.9, green: 0.1", None),  # no tags
        ("", None),
    ],
)
def test_parse_rationale(text, expected):
    assert parse_rationale(text, ARMS) == expected


def test_ucb_entries_values_and_spans():
    text = "x <ucb_values>\nred: 0.71\ngreen = 1e-1\nblue: -inf\n</ucb_values>"
    entries = parse_ucb_values(text, ARMS)
    assert [e.arm for e in entries] == [0, 1, 2]
    assert [e.value for e in entries] == [0.71, 0.1, -math.inf]
    assert text[slice(*entries[0].name_span)] == "red"
    assert text[slice(*entries[1].value_span)] == "1e-1"
    assert text[slice(*entries[0].span)] == "red: 0.71"
    assert top_entry(entries).arm == 0
    assert top_entry([]) is None


def test_repeated_arm_keeps_last_entry():
    entries = parse_ucb_values("<ucb_values>red: 0.1\nred: 0.9\ngreen: 0.5</ucb_values>", ARMS)
    assert [(e.arm, e.value) for e in entries] == [(0, 0.9), (1, 0.5)]
