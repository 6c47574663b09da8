"""Bandit environments and the history statistics that label every step (no models here)."""

from kdgap.envs.arms import BUTTON_COLORS, arm_names
from kdgap.envs.bandit import BanditConfig, VectorBandit
from kdgap.envs.stats import (
    counts_and_sums,
    first_arm,
    greedy_arms,
    most_frequent_arms,
    ucb_arms,
    ucb_values,
)

__all__ = [
    "BUTTON_COLORS",
    "BanditConfig",
    "VectorBandit",
    "arm_names",
    "counts_and_sums",
    "first_arm",
    "greedy_arms",
    "most_frequent_arms",
    "ucb_arms",
    "ucb_values",
]
