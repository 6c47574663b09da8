"""The one parameter validator (kdgap._checks): hand-written cases and exact messages."""

from __future__ import annotations

import re

import numpy as np
import pytest

from kdgap._checks import check_int, check_ints


@pytest.mark.parametrize(
    ("value", "minimum", "want"),
    [(1, 1, 1), (7, 1, 7), (0, 0, 0), (-2, -3, -2), (np.int64(3), 1, 3), (np.uint8(2), 2, 2)],
)
def test_accepted_values_come_back_as_plain_ints(value, minimum, want):
    got = check_int("n", value, minimum=minimum)
    assert got == want and type(got) is int


@pytest.mark.parametrize("value", [0, -1, True, False, 2.0, 1.5, "3", None, [1]])
def test_refused_values_name_the_parameter_value_and_bound(value):
    with pytest.raises(ValueError) as err:
        check_int("episodes", value)
    assert str(err.value) == f"episodes={value!r} must be an integer >= 1."


def test_bool_is_refused_even_where_its_int_value_would_pass():
    # True == 1 and False == 0 as ints, but a flag is no count.
    with pytest.raises(ValueError, match=re.escape("n=True must be an integer >= 1.")):
        check_int("n", True)
    with pytest.raises(ValueError, match=re.escape("n=False must be an integer >= 0.")):
        check_int("n", False, minimum=0)


def test_none_only_with_optional():
    assert check_int("batch_size", None, optional=True) is None
    with pytest.raises(ValueError) as err:
        check_int("batch_size", None)
    assert str(err.value) == "batch_size=None must be an integer >= 1."
    with pytest.raises(ValueError) as err:
        check_int("batch_size", 0, optional=True)
    assert str(err.value) == "batch_size=0 must be an integer >= 1 or None."
    assert check_int("batch_size", 4, optional=True) == 4


def test_minimum_and_hint_are_in_the_message():
    with pytest.raises(ValueError) as err:
        check_int("first_episode", -1, minimum=0)
    assert str(err.value) == "first_episode=-1 must be an integer >= 0."
    with pytest.raises(ValueError) as err:
        check_int("horizon", 0, hint="(paper: 50)")
    assert str(err.value) == "horizon=0 must be an integer >= 1. (paper: 50)"
    with pytest.raises(ValueError) as err:
        check_int("batch_size", -3, optional=True, hint="(None: all at once)")
    assert str(err.value) == "batch_size=-3 must be an integer >= 1 or None. (None: all at once)"


def test_check_ints_checks_every_parameter_and_names_the_bad_one():
    assert check_ints(n=1, batch_size=8) is None
    with pytest.raises(ValueError) as err:
        check_ints(n=2, batch_size=0)
    assert str(err.value) == "batch_size=0 must be an integer >= 1."
    with pytest.raises(ValueError) as err:
        check_ints(minimum=5, pairs=4)
    assert str(err.value) == "pairs=4 must be an integer >= 5."


@pytest.mark.parametrize(("value", "ok"), [(1, False), (2, True), (20, True), (21, False)])
def test_maximum_bounds_both_ends_and_says_so(value, ok):
    if ok:
        assert check_int("n_arms", value, minimum=2, maximum=20) == value
        return
    with pytest.raises(ValueError) as err:
        check_int("n_arms", value, minimum=2, maximum=20, hint="(paper: 5)")
    assert str(err.value) == f"n_arms={value} must be an integer from 2 to 20. (paper: 5)"
