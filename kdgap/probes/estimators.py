"""Linear probes with scikit-learn's estimator conventions.

- :class:`LogisticProbe`: multinomial logistic regression on standardised inputs, its L2
  strength ``C`` chosen by inner cross-validation whose folds are whole episodes.
- :class:`DiffMeansProbe`: the difference-of-means baseline (nearest class centroid),
  which docs/science.md section 4 asks every probe result to be reported against.

Both take hyper-parameters as keyword-only ``__init__`` arguments, return ``self`` from
``fit``, end learned attributes in ``_`` and expose ``directions_``: one direction per
class in the *input* (activation) space, ``Float[ndarray, "n_classes d_model"]``, which the
causal checks steer along and the knowing-doing analysis compares.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float, Int
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

from kdgap.probes.splits import grouped_folds

#: Regularisation grid shared by the scikit-learn probe and the batched trainer.
DEFAULT_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
#: C selection keeps the strongest regularisation within this much CV accuracy of the best.
DEFAULT_CV_TOLERANCE = 0.005


def select_C(
    cv_scores: Float[np.ndarray, "... n_Cs"], *, tolerance: float = DEFAULT_CV_TOLERANCE
) -> Int[np.ndarray, "..."]:
    """Index of the chosen C: the smallest (strongest regularisation) whose mean CV
    accuracy is within ``tolerance`` of the best.

    A one-standard-error-style rule: it prefers the simpler probe among near-ties, and it
    makes the choice insensitive to solver noise (two correct solvers that stop at slightly
    different points agree on C, so the scikit-learn probe and the batched trainer agree).

    Args:
        cv_scores: ``Float[ndarray, "... n_Cs"]`` mean inner-CV accuracy, Cs ascending.

    Returns:
        ``Int[ndarray, "..."]`` index into the Cs.
    """
    cv_scores = np.asarray(cv_scores)
    ok = cv_scores >= cv_scores.max(axis=-1, keepdims=True) - tolerance - 1e-12
    return np.argmax(ok, axis=-1)


#: What the probes fit on: activations ``[n_examples, d_model]``, and one integer per
#: example (class labels, or episode ids for ``groups``).
Activations = Float[np.ndarray, "n_examples d_model"]
PerExample = Int[np.ndarray, " n_examples"]


def _as_2d(X: Activations) -> Activations:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D [n_examples, d_model]; got shape {X.shape}.")
    return X


class _LinearProbe(ClassifierMixin, BaseEstimator):
    """Shared predict/score for probes with ``classes_``, ``directions_``, ``bias_``."""

    def decision_function(self, X: Activations) -> Float[np.ndarray, "n_examples n_classes"]:
        """Class scores (argmax = prediction)."""
        return _as_2d(X) @ self.directions_.T + self.bias_

    def predict(self, X: Activations) -> PerExample:
        """Predicted class (values from ``classes_``)."""
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


class LogisticProbe(_LinearProbe):
    """Multinomial logistic-regression probe; C picked by episode-grouped inner CV.

    Inputs are standardised per feature on the training set; ``C`` is the inverse L2
    strength of scikit-learn's ``LogisticRegression`` (objective
    ``sum_i CE_i + ||W||^2 / (2 C)`` on standardised inputs) and is chosen from ``Cs`` by
    mean accuracy over ``cv`` folds of whole episodes (the strongest
    regularisation within ``cv_tolerance`` of the best, :func:`select_C`), then refit on
    all training examples.

    Args:
        Cs: candidate C values, tried in ascending order.
        cv_tolerance: see :func:`select_C`.
        cv: number of inner folds (episodes dealt by :func:`grouped_folds`).
        max_iter, tol: L-BFGS limits passed to scikit-learn.
        random_state: seed of the inner fold assignment.

    Attributes:
        classes_: ``[n_classes]`` labels seen in ``fit``.
        mean_, scale_: ``[d_model]`` standardisation.
        C_: chosen C. cv_scores_: ``[n_Cs]`` mean inner-CV accuracy per C.
        coef_: ``[n_classes, d_model]`` weights on standardised inputs; intercept_ ``[n_classes]``.
        directions_: ``[n_classes, d_model]`` the same weights in input space
            (``coef_ / scale_``); bias_: ``[n_classes]`` matching intercepts.
    """

    def __init__(
        self,
        *,
        Cs: Sequence[float] = DEFAULT_CS,
        cv: int = 4,
        cv_tolerance: float = DEFAULT_CV_TOLERANCE,
        max_iter: int = 1000,
        tol: float = 1e-4,
        random_state: int = 0,
    ):
        self.Cs = Cs
        self.cv = cv
        self.cv_tolerance = cv_tolerance
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def fit(self, X: Activations, y: PerExample, groups: PerExample | None = None) -> LogisticProbe:
        """Fit on ``X: [n_examples, d_model]``, ``y: [n_examples]``, ``groups: [n_examples]``.

        ``groups`` (episode ids) is required: inner folds that split an episode would pick
        C by how well the probe memorises episodes.
        """
        X, y = _as_2d(X), np.asarray(y)
        if groups is None:
            raise ValueError(
                "groups=None: LogisticProbe picks C by cross-validation over whole "
                "episodes; pass groups=labels['episode'] for the training rows."
            )
        self.mean_ = X.mean(axis=0)
        # Constant features (e.g. padding dims) get scale 1 instead of a division by zero.
        scale = X.std(axis=0)
        self.scale_ = np.where(scale > 1e-12, scale, 1.0)
        Z = (X - self.mean_) / self.scale_
        folds = grouped_folds(np.asarray(groups), n_splits=self.cv, seed=self.random_state)
        Cs = sorted(float(c) for c in self.Cs)
        search = LogisticRegressionCV(
            Cs=Cs, cv=folds, l1_ratios=(0.0,), scoring="accuracy", solver="lbfgs",
            max_iter=self.max_iter, tol=self.tol, use_legacy_attributes=False, refit=False,
        )  # fmt: skip
        with warnings.catch_warnings():
            # Weakly regularised candidates on separable data hit max_iter; their
            # accuracy is still what CV should compare, so the warning is noise here.
            warnings.simplefilter("ignore", ConvergenceWarning)
            search.fit(Z, y)
            self.cv_scores_ = np.asarray(search.scores_).reshape(len(folds), -1).mean(axis=0)
            self.C_ = Cs[int(select_C(self.cv_scores_, tolerance=self.cv_tolerance))]
            model = LogisticRegression(C=self.C_, max_iter=self.max_iter, tol=self.tol)
            model.fit(Z, y)
        self.classes_ = model.classes_
        coef, intercept = model.coef_, model.intercept_
        if coef.shape[0] == 1:
            # Binary: scikit-learn stores one row w; softmax over [-w/2, w/2] is the
            # same model with one direction per class, as multi-class callers expect.
            coef = np.vstack([-coef[0] / 2, coef[0] / 2])
            intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
        self.coef_, self.intercept_ = coef, intercept
        self.directions_ = coef / self.scale_
        self.bias_ = intercept - self.directions_ @ self.mean_
        self.n_features_in_ = X.shape[1]
        return self

    def predict_proba(self, X: Activations) -> Float[np.ndarray, "n_examples n_classes"]:
        """Class probabilities."""
        s = self.decision_function(X)
        s = np.exp(s - s.max(axis=1, keepdims=True))
        return s / s.sum(axis=1, keepdims=True)


class DiffMeansProbe(_LinearProbe):
    """Difference-of-means baseline: nearest class centroid in input space.

    ``directions_[k] = mu_k - mean_j mu_j`` (class mean minus the mean of class means) and
    the prediction is the nearest centroid, i.e. ``argmax_k (x - m) . d_k - |d_k|^2 / 2``.
    No hyper-parameters; ``groups`` is accepted (and ignored) so both probes fit alike.

    Attributes:
        classes_: ``[n_classes]``; means_: ``[n_classes, d_model]`` class centroids;
        directions_: ``[n_classes, d_model]``; bias_: ``[n_classes]``.
    """

    def __init__(self):
        pass

    def fit(
        self, X: Activations, y: PerExample, groups: PerExample | None = None
    ) -> DiffMeansProbe:
        """Fit on ``X: [n_examples, d_model]`` and ``y: [n_examples]``."""
        X, y = _as_2d(X), np.asarray(y)
        self.classes_, inverse = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"y has one class {self.classes_.tolist()}; a probe needs at least two."
            )
        counts = np.bincount(inverse)
        self.means_ = np.stack([X[inverse == k].mean(axis=0) for k in range(len(counts))])
        centre = self.means_.mean(axis=0)
        self.directions_ = self.means_ - centre
        self.bias_ = -self.directions_ @ centre - 0.5 * (self.directions_**2).sum(axis=1)
        self.n_features_in_ = X.shape[1]
        return self
