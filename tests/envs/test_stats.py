import math

import numpy as np
import pytest

from kdgap.envs.stats import (
    counts_and_sums,
    first_arm,
    greedy_arms,
    most_frequent_arms,
    ucb_arms,
    ucb_values,
)


def test_ucb_values_hand_computed():
    counts = np.array([2, 1, 1])
    sums = np.array([1.0, 1.0, 0.0])
    t = 4
    v = ucb_values(counts, sums, c=0.5)
    expected = [
        0.5 + 0.5 * math.sqrt(math.log(t) / 2),
        1 + 0.5 * math.sqrt(math.log(t)),
        0.5 * math.sqrt(math.log(t)),
    ]  # noqa: E501
    np.testing.assert_allclose(v, expected)
    v1 = ucb_values(counts, sums, c=1.0, bonus="ucb1")
    np.testing.assert_allclose(v1[0], 0.5 + math.sqrt(2 * math.log(t) / 2))


def test_untried_arms_are_infinite_and_tie():
    counts = np.array([1, 0, 0])
    sums = np.array([1.0, 0, 0])
    assert ucb_arms(counts, sums).tolist() == [False, True, True]
    assert first_arm(ucb_arms(counts, sums)) == 1


def test_greedy_is_among_tried_arms_only_and_keeps_ties():
    counts = np.array([2, 0, 2, 1])
    sums = np.array([1.0, 0.0, 1.0, 0.0])
    assert greedy_arms(counts, sums).tolist() == [True, False, True, False]
    assert greedy_arms(np.zeros(3), np.zeros(3)).all()  # nothing tried: all arms


def test_most_frequent_and_counts():
    counts, sums = counts_and_sums(np.array([0, 2, 2, 1]), np.array([1, 0, 1, 1.0]), 3)
    assert counts.tolist() == [1, 1, 2]
    assert sums.tolist() == [1.0, 1.0, 1.0]
    assert most_frequent_arms(counts).tolist() == [False, False, True]
    with pytest.raises(ValueError, match="outside"):
        counts_and_sums(np.array([3]), np.array([1.0]), 3)


def test_bad_bonus_and_c():
    with pytest.raises(ValueError, match="bonus"):
        ucb_values(np.ones(2), np.ones(2), bonus="x")
    with pytest.raises(ValueError, match="c="):
        ucb_values(np.ones(2), np.ones(2), c=-1)
