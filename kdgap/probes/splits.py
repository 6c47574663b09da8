"""Train/test splits grouped by episode, never by step.

Steps of one episode share a history prefix, so their activations share an episode
"fingerprint" (the same arms pulled, the same rewards). A split by step puts near-copies of
a test example in the training set and lets a probe score by recognising the episode
instead of decoding the label (docs/science.md section 4: "split by episode, never by step").
Every split here assigns whole episodes to one side; ``tests/probes/test_splits_stats.py`` builds
a store where a step-level split would leak and shows these do not.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Int


def _groups(
    groups: Int[np.ndarray, " n_examples"], name: str = "groups"
) -> tuple[Int[np.ndarray, " n_groups"], Int[np.ndarray, " n_examples"]]:
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D array of episode ids (one per example); "
            f"got shape {groups.shape}."
        )
    uniq, inverse = np.unique(groups, return_inverse=True)
    return uniq, inverse


def grouped_train_test_split(
    groups: Int[np.ndarray, " n_examples"], *, test_size: float = 0.25, seed: int = 0
) -> tuple[Int[np.ndarray, " n_train"], Int[np.ndarray, " n_test"]]:
    """Split examples into train/test by whole episodes.

    Args:
        groups: ``Int[ndarray, "n_examples"]`` episode id of every example.
        test_size: fraction of *episodes* held out (rounded, at least 1, at most all but 1).
        seed: seed of the episode permutation.

    Returns:
        ``(train_idx, test_idx)``: ``Int[ndarray, "n_train"]``, ``Int[ndarray, "n_test"]``,
        sorted example indices; no episode appears on both sides.
    """
    uniq, inverse = _groups(groups)
    if len(uniq) < 2:
        raise ValueError(
            f"groups has {len(uniq)} episode(s); a grouped split needs at least 2. "
            "Record more episodes."
        )
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size={test_size!r} must be a fraction in (0, 1), e.g. 0.25.")
    n_test = int(np.clip(round(test_size * len(uniq)), 1, len(uniq) - 1))
    perm = np.random.default_rng(seed).permutation(len(uniq))
    is_test = np.zeros(len(uniq), dtype=bool)
    is_test[perm[:n_test]] = True
    test_mask = is_test[inverse]
    return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)


def grouped_folds(
    groups: Int[np.ndarray, " n_examples"], *, n_splits: int = 4, seed: int = 0
) -> list[tuple[Int[np.ndarray, " n_train"], Int[np.ndarray, " n_val"]]]:
    """K-fold cross-validation folds made of whole episodes.

    Episodes are permuted with ``seed`` and dealt into ``n_splits`` nearly equal parts, so
    the same groups and seed give the same folds whatever the caller (the scikit-learn
    probe and the batched trainer rely on this to select C on identical folds).

    Args:
        groups: ``Int[ndarray, "n_examples"]`` episode id of every example.
        n_splits: number of folds (at least 2, at most the number of episodes).
        seed: seed of the episode permutation.

    Returns:
        ``n_splits`` pairs ``(train_idx, val_idx)`` of sorted example indices.
    """
    uniq, inverse = _groups(groups)
    if not 2 <= n_splits <= len(uniq):
        raise ValueError(
            f"n_splits={n_splits} folds need 2 <= n_splits <= number of episodes "
            f"({len(uniq)}); lower cv or record more episodes."
        )
    perm = np.random.default_rng(seed).permutation(len(uniq))
    fold_of_group = np.empty(len(uniq), dtype=np.int64)
    for f, part in enumerate(np.array_split(perm, n_splits)):
        fold_of_group[part] = f
    fold = fold_of_group[inverse]
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(n_splits)]


def check_no_shared_groups(
    groups: Int[np.ndarray, " n_examples"],
    train_idx: Int[np.ndarray, " n_train"],
    test_idx: Int[np.ndarray, " n_test"],
) -> None:
    """Raise if any episode has examples on both sides of a split (a leak)."""
    groups = np.asarray(groups)
    shared = np.intersect1d(groups[train_idx], groups[test_idx])
    if len(shared):
        raise ValueError(
            f"split leaks: episodes {shared[:10].tolist()} are in both train and test. "
            "Use grouped_train_test_split / grouped_folds."
        )
