"""A torch trainer that fits every layer's (and every task's) logistic probe at once.

Looping scikit-learn over layers solves hundreds of small problems whose matrix products
are only ``n_classes`` columns wide, so they run memory-bound with Python overhead per
solver step. Here every problem of a site -- layers x tasks (labels and their control
tasks) x inner folds -- is solved together by :func:`kdgap.probes._lbfgs.lbfgs_softmax`
over one stacked weight tensor ``[n_layers * n_folds, n_tasks, d_model + 1, n_classes]``
(each fold sees only its own training rows). The C grid is walked from strongest to
weakest regularisation, each stage warm-started from the last (as scikit-learn's
``LogisticRegressionCV`` does), then every (layer, task) is refit at its chosen C in one
more stacked solve. ``experiments/bench/probes.py`` measures the speed-up against
scikit-learn (docs/benchmarks.md).

Each problem is scikit-learn's ``LogisticRegression(C=C)`` objective on inputs
standardised per layer (over the site's training rows; for a task with missing labels,
e.g. unparsed rationale arms or dropped rare classes, scikit-learn's probe standardises
over that task's rows only, so the same C is then a slightly different penalty):

    mean_i CE(softmax(W z_i + b), y_i) + ||W||^2 / (2 C n)

(the bias is not penalised; binary tasks use twice the penalty on the two-class softmax,
which equals scikit-learn's binary logistic loss with the same C). C is picked per
(layer, task) by mean accuracy over the same episode-grouped folds
:class:`kdgap.probes.estimators.LogisticProbe` uses, with the same rule
(:func:`kdgap.probes.estimators.select_C`).

Every solve runs in whitened coordinates of its layer (see :mod:`kdgap.probes._lbfgs`):
an exact reparametrisation that leaves the minimiser unchanged and shortens the path to
it. Fold problems use their layer's map too (any invertible map is exact; a fold's rows
come out whitened up to sampling noise). ``tests/probes/test_batched.py`` checks the
optimum on ill-conditioned, rank-deficient features, and agreement with scikit-learn
within 1 point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int

from kdgap.probes._lbfgs import (
    from_whitened,
    lbfgs_softmax,
    whitened_inputs,
    whitened_penalty,
    whitening,
)
from kdgap.probes.estimators import DEFAULT_CS, DEFAULT_CV_TOLERANCE, select_C
from kdgap.probes.splits import grouped_folds

_MASKED = -1e30  # logit given to padding classes a task does not have


@dataclass
class BatchedLogisticFit:
    """Probes for every (layer, task), fitted by :func:`fit_logistic_batched`.

    Attributes:
        classes: per task, its labels (class index -> label).
        mean, scale: standardisation of each layer's inputs, ``z = (x - mean) / scale``.
        coef: weights in standardised space (padding classes, beyond a task's own, are
            zero); intercept: the biases.
        C: chosen C per (layer, task); cv_scores: mean inner-CV accuracy of every C.
        n_iter: L-BFGS iterations the whole batch took.
    """

    classes: list[Int[np.ndarray, " n_classes_t"]]
    mean: Float[torch.Tensor, "n_layers d_model"]
    scale: Float[torch.Tensor, "n_layers d_model"]
    coef: Float[torch.Tensor, "n_layers n_tasks n_classes d_model"]
    intercept: Float[torch.Tensor, "n_layers n_tasks n_classes"]
    C: Float[np.ndarray, "n_layers n_tasks"]
    cv_scores: Float[np.ndarray, "n_layers n_tasks n_Cs"]
    n_iter: int

    def _class_bias(self) -> Float[torch.Tensor, "n_tasks n_classes"]:
        K = self.coef.shape[2]
        have = torch.tensor([[k < len(c) for k in range(K)] for c in self.classes])
        return torch.where(have, 0.0, _MASKED).to(self.coef.dtype)

    def directions(self) -> Float[torch.Tensor, "n_layers n_tasks n_classes d_model"]:
        """Weights in input (activation) space: ``coef / scale``."""
        return self.coef / self.scale[:, None, None, :]

    def decision(
        self, X: Float[torch.Tensor | np.ndarray, "n_layers n_examples d_model"]
    ) -> Float[torch.Tensor, "n_layers n_tasks n_examples n_classes"]:
        """Class scores for ``X``; padding classes (beyond a task's own) score -1e30."""
        X = torch.as_tensor(X, dtype=self.coef.dtype)
        Z = (X - self.mean[:, None]) / self.scale[:, None]
        out = torch.einsum("lnd,ltkd->ltnk", Z, self.coef) + self.intercept[:, :, None]
        return out + self._class_bias()[None, :, None]

    def predict(
        self, X: Float[torch.Tensor | np.ndarray, "n_layers n_examples d_model"]
    ) -> Int[np.ndarray, "n_layers n_tasks n_examples"]:
        """Predicted labels (values from ``classes``)."""
        idx = self.decision(X).argmax(-1).numpy()
        table = np.full((len(self.classes), self.coef.shape[2]), -1, dtype=np.int64)
        for t, c in enumerate(self.classes):
            table[t, : len(c)] = c
        return np.take_along_axis(table[None, :, :], idx.reshape(idx.shape[0], len(table), -1),
                                  axis=2)  # fmt: skip


def fit_logistic_batched(
    X: Float[torch.Tensor | np.ndarray, "n_layers n_examples d_model"],
    y: Int[np.ndarray, "n_tasks n_examples"] | Int[np.ndarray, " n_examples"],
    groups: Int[np.ndarray, " n_examples"],
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    cv: int = 4,
    cv_tolerance: float = DEFAULT_CV_TOLERANCE,
    max_iter: int = 1000,
    tol: float = 1e-5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    refit_dtype: torch.dtype = torch.float64,
) -> BatchedLogisticFit:
    """Fit logistic probes for every layer and task in one batched optimisation.

    Args:
        X: ``Float[Tensor | ndarray, "n_layers n_examples d_model"]`` training activations,
            one slice per layer (or hook) of the same examples.
        y: ``Int[ndarray, "n_tasks n_examples"]`` labels per task (e.g. rationale arm,
            action, a control task); -1 = missing, that row is left out of that task.
        groups: ``Int[ndarray, "n_examples"]`` episode ids (inner folds are whole episodes).
        Cs, cv, cv_tolerance, seed: as :class:`kdgap.probes.estimators.LogisticProbe`.
        max_iter, tol: L-BFGS limits per solve (:func:`lbfgs_softmax`); ``tol`` bounds
            the gradient in whitened coordinates (a float32 solve usually stops earlier,
            at its objective's float32 resolution).
        dtype: solver dtype of the inner-CV fold fits, which only pick C (the whitening
            and the maps back are float64).
        refit_dtype: solver dtype of the final refit, which gives the probes. float64
            (default) reaches the optimum (the tests check it on ill-conditioned
            features) for a little more time than float32, which stops at its own
            resolution of the objective.

    Returns:
        :class:`BatchedLogisticFit`.
    """
    X = torch.as_tensor(np.asarray(X) if not torch.is_tensor(X) else X)
    if X.ndim != 3:
        raise ValueError(f"X must be [n_layers, n_examples, d_model]; got shape {tuple(X.shape)}.")
    X = X.double()
    L, n, d = X.shape
    y = np.atleast_2d(np.asarray(y, dtype=np.int64))
    if y.shape[1] != n:
        raise ValueError(f"y has {y.shape[1]} examples per task but X has {n}; align them.")
    mean = X.mean(dim=1)
    scale = X.std(dim=1, unbiased=False)
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    Z = (X - mean[:, None]) / scale[:, None]  # standardised, float64
    del X

    classes = [np.unique(row[row >= 0]) for row in y]
    for t, c in enumerate(classes):
        if len(c) < 2:
            raise ValueError(f"task {t} of y has classes {c.tolist()}; a probe needs >= 2.")
    K = max(len(c) for c in classes)
    enc = np.stack([np.where(row >= 0, np.searchsorted(c, row), -1) for row, c in zip(y, classes)])
    groups = np.asarray(groups)
    Cs = sorted(float(c) for c in Cs)
    T, nC, F = len(y), len(Cs), cv
    # Per task, folds over that task's non-missing rows, exactly as LogisticProbe would
    # deal them given only those rows (same episodes, same seed -> same folds).
    vals: list[list[np.ndarray]] = []
    weights = np.zeros((n, T, F + 1))  # problem (t, f): fold fits f < cv, refit f = cv
    n_rows = np.zeros((T, F + 1))
    for t in range(T):
        rows_t = np.flatnonzero(enc[t] >= 0)
        folds = grouped_folds(groups[rows_t], n_splits=cv, seed=seed)
        vals.append([rows_t[va] for _, va in folds])
        for f, rows in enumerate([rows_t[tr] for tr, _ in folds] + [rows_t]):
            weights[rows, t, f] = 1.0 / len(rows)
            n_rows[t, f] = len(rows)
    binary = np.array([2.0 if len(c) == 2 else 1.0 for c in classes])
    Yoh = np.zeros((n, T, K))
    for t in range(T):
        ok = enc[t] >= 0
        Yoh[np.flatnonzero(ok), t, enc[t][ok]] = 1.0
    bias = np.array([[0.0 if k < len(c) else _MASKED for k in range(K)] for c in classes])
    bf = torch.tensor(bias, dtype=dtype)

    # Solver coordinates: each layer whitened once, on all its rows. Any invertible map
    # is an exact reparametrisation, so the fold problems use the same one; a fold's rows
    # (3/4 of them) are then whitened up to sampling noise, which is all the
    # preconditioner needs, and fold solutions, refit warm start and CV scores all live
    # in one coordinate system.
    mu, Q, lam = whitening(Z)
    U64 = whitened_inputs(Z, mu, Q, lam, refit_dtype)  # [L, n, d + 1]
    U = U64.to(dtype)
    del Z

    # Fold fits along the C path, strongest regularisation first, each stage warm-started
    # from the previous one (as scikit-learn's LogisticRegressionCV does along Cs): the
    # solutions move little between neighbouring Cs, so each stage takes few iterations.
    # Each fold's problems see only that fold's training rows: the stacked "layer" axis
    # of the solver becomes (layer, fold), which skips the 1/cv of rows each fold leaves
    # out instead of multiplying them by zero weights.
    fold_rows = [np.flatnonzero(weights[:, :, f].sum(1) > 0) for f in range(F)]
    nf = max(len(r) for r in fold_rows)
    idx = np.zeros((F, nf), dtype=np.int64)
    pad = np.ones((F, nf), dtype=bool)
    for f, r in enumerate(fold_rows):
        idx[f, : len(r)], pad[f, : len(r)] = r, False
    Uf = U[:, torch.as_tensor(idx)].reshape(L * F, nf, d + 1)
    lam_f = lam.repeat_interleave(F, dim=0)  # [L * F, d]
    wf = weights[idx, :, np.arange(F)[:, None]]  # [F, nf, T]
    wf[pad] = 0.0  # padding rows (copies of row 0) carry no weight
    wf = torch.tensor(wf, dtype=dtype).repeat(L, 1, 1)
    Yf = torch.tensor(Yoh[idx], dtype=dtype).repeat(L, 1, 1, 1)  # [L * F, nf, T, K]
    thetas, n_iter, theta = [], 0, None
    for C in Cs:
        reg = torch.tensor(binary[None, :] / (C * n_rows[:, :F].T)).repeat(L, 1)  # [L*F, T]
        theta, it = lbfgs_softmax(Uf, Yf, wf, whitened_penalty(reg, lam_f), bf, theta0=theta,
                                  max_iter=max_iter, tol=tol)  # fmt: skip
        thetas.append(theta.view(L, F, T, d + 1, K).transpose(1, 2))
        n_iter += it
    del Uf, Yf, wf
    theta = torch.stack(thetas, dim=2)  # [L, T, nC, F, d + 1, K], whitened

    # Inner-CV accuracy: mean over folds of each fold's validation accuracy (as sklearn),
    # scoring each fold's fits on that fold's held-out rows only.
    cv_scores = np.zeros((L, T, nC))
    bias_t = torch.tensor(bias, dtype=dtype)[:, None]  # [T, 1, K]
    for f in range(F):
        rows = np.unique(np.concatenate([vals[t][f] for t in range(T)]))
        V = theta[:, :, :, f].permute(0, 3, 1, 2, 4).reshape(L, d + 1, T * nC * K)
        logits = torch.bmm(U[:, torch.as_tensor(rows)], V).view(L, len(rows), T, nC, K)
        pred = (logits + bias_t).argmax(-1).numpy()  # [L, rows, T, nC]
        for t in range(T):
            at = np.searchsorted(rows, vals[t][f])
            hit = pred[:, at, t, :] == enc[t][vals[t][f]][None, :, None]
            cv_scores[:, t] += hit.mean(axis=1) / cv
    best = select_C(cv_scores, tolerance=cv_tolerance)
    C_best = np.asarray(Cs)[best]  # [L, T]

    # Refit each (layer, task) at its chosen C on all its rows, warm-started from the mean
    # of that C's fold solutions (scikit-learn's refit does the same).
    Yr = torch.tensor(Yoh, dtype=refit_dtype)
    wr = torch.tensor(weights[:, :, F], dtype=refit_dtype)
    pick = theta[torch.arange(L)[:, None], torch.arange(T)[None, :], torch.as_tensor(best)]
    reg = torch.tensor(binary[None, :] / (C_best * n_rows[None, :, F]))  # [L, T]
    chosen, it = lbfgs_softmax(U64, Yr, wr, whitened_penalty(reg, lam), bf.to(refit_dtype),
                               theta0=pick.mean(dim=2), max_iter=max_iter, tol=tol)  # fmt: skip
    n_iter += it
    chosen = from_whitened(chosen, mu, Q, lam)  # standardised coordinates, float64
    return BatchedLogisticFit(
        classes=classes, mean=mean.to(dtype), scale=scale.to(dtype),
        coef=chosen[..., :d, :].transpose(-1, -2).to(dtype).contiguous(),
        intercept=chosen[..., d, :].to(dtype).contiguous(),
        C=C_best, cv_scores=cv_scores, n_iter=n_iter,
    )  # fmt: skip
