"""A torch trainer that fits every layer's (and every task's) logistic probe at once.

Looping scikit-learn over layers solves hundreds of small problems whose matrix products
are only ``n_classes`` columns wide, so they run memory-bound with Python overhead per
solver step. Here every problem of a site -- layers x tasks (labels and their control
tasks) x inner folds -- is solved together over one stacked weight tensor
``[n_layers * n_folds, n_tasks, d_model + 1, n_classes]`` (each fold sees only its own
training rows), so a solver step is two wide ``bmm`` calls. The C grid is walked from
strongest to weakest regularisation, each stage warm-started from the last (as
scikit-learn's ``LogisticRegressionCV`` does), then every (layer, task) is refit at its
chosen C in one more stacked solve. The problems are independent, so the solver
(:func:`lbfgs_softmax`) keeps a separate L-BFGS history, step size and stopping test per
problem and drops converged problems from the stack: stacking changes the speed, not the
solution. ``experiments/bench/probes.py`` measures the speed-up.

Each problem is exactly scikit-learn's ``LogisticRegression(C=C)`` objective on inputs
standardised per layer:

    mean_i CE(softmax(W z_i + b), y_i) + ||W||^2 / (2 C n)

(the bias is not penalised; binary tasks use twice the penalty on the two-class softmax,
which equals scikit-learn's binary logistic loss with the same C). C is picked per
(layer, task) by mean accuracy over the same episode-grouped folds
:class:`kdgap.probes.estimators.LogisticProbe` uses, with the same rule
(:func:`kdgap.probes.estimators.select_C`).
``tests/probes/test_batched.py`` checks agreement with scikit-learn within 1 point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kdgap.probes.estimators import DEFAULT_CS, DEFAULT_CV_TOLERANCE, select_C
from kdgap.probes.splits import grouped_folds

_MASKED = -1e30  # logit given to padding classes a task does not have


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-problem inner product of ``[L, M, D, K]`` tensors -> ``[L, M]``."""
    return (a * b).sum(dim=(-1, -2))


@torch.no_grad()
def lbfgs_softmax(
    Xa: torch.Tensor,
    Yoh: torch.Tensor,
    weights: torch.Tensor,
    reg: torch.Tensor,
    class_bias: torch.Tensor,
    *,
    theta0: torch.Tensor | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
    history: int = 10,
) -> tuple[torch.Tensor, int]:
    """Minimise many independent L2-regularised softmax regressions by batched L-BFGS.

    Problem ``m`` at layer ``l`` minimises
    ``sum_i weights[i, m] CE_i + reg[m] / 2 * ||W||^2`` over ``theta[l, m]``.

    Args:
        Xa: ``Float[Tensor, "n_layers n_examples d_plus_1"]`` inputs with a trailing
            column of ones (the bias; not penalised).
        Yoh: ``Float[Tensor, "n_examples n_models n_classes"]`` one-hot targets, or
            ``[n_layers, n_examples, n_models, n_classes]`` when they differ per layer.
        weights: ``Float[Tensor, "n_examples n_models"]`` row weights, each column summing
            to 1 over that problem's training rows (0 elsewhere); or
            ``[n_layers, n_examples, n_models]``.
        reg: ``Float[Tensor, "n_models"]`` or ``Float[Tensor, "n_layers n_models"]`` L2
            strength (``1 / (C n)``).
        class_bias: ``Float[Tensor, "n_models n_classes"]`` 0, or a huge negative value
            for padding classes.
        theta0: ``Float[Tensor, "n_layers n_models d_plus_1 n_classes"]`` warm start
            (zeros if None).
        max_iter: iteration limit; tol: stop a problem when max |gradient| <= tol
            (scikit-learn's ``gtol``).
        history: L-BFGS memory.

    Returns:
        ``(theta, n_iter)``: ``Float[Tensor, "n_layers n_models d_plus_1 n_classes"]``.
    """
    L, n, D = Xa.shape
    M, K = class_bias.shape
    dt = Xa.dtype
    eps = torch.finfo(dt).eps
    penal = torch.ones(D, 1, dtype=dt)
    penal[-1] = 0.0
    reg_mat = reg.expand(L, M)[..., None, None] * penal  # [L, M, D, 1]
    XaT = Xa.transpose(1, 2).contiguous()
    # Classes sit *before* problems ([.., K, M]) so softmax reductions run over K slices
    # of contiguous problems; a trailing dim of size K would not vectorise.
    # The data term's linear part sum_i w_i z_{i, y_i} is <theta, Xa^T (w Y)>: computed
    # once here, it saves two passes over the [L, n, K, M] logits per evaluation.
    weights = weights.expand(L, n, M) if weights.ndim == 2 else weights
    Yw = (Yoh * weights[..., None]).expand(L, n, M, K)
    G0 = torch.einsum("lnd,lnmk->lmdk", Xa, Yw)
    bias_km = class_bias.T.contiguous()  # [K, M]
    needs_bias = bool((class_bias != 0).any())
    xa_max = Xa.norm(dim=-1).amax(dim=1)  # [L] largest input norm (ones column included)

    def fg(theta: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss ``[L, m]`` and gradient ``[L, m, D, K]`` of the problems ``cols`` only."""
        m = len(cols)
        if m == M:  # every problem: skip the gathers (most evaluations)
            th, w, G0c, regc, bias_c = theta, weights[:, :, None, :], G0, reg_mat, bias_km
        else:
            th, w, G0c = theta[:, cols], weights[:, :, cols][:, :, None, :], G0[:, cols]
            regc, bias_c = reg_mat[:, cols], bias_km[:, cols]
        z = torch.bmm(Xa, th.permute(0, 2, 3, 1).reshape(L, D, K * m)).view(L, n, K, m)
        if needs_bias:
            z += bias_c
        # Cauchy-Schwarz bounds every logit by |x| |theta_k|; below 60 exp() can neither
        # overflow nor underflow in float32, so the max-subtraction pass is skipped.
        bound = float((xa_max[:, None] * th.norm(dim=2).amax(dim=-1)).max())
        if needs_bias or bound > 60.0:
            zmax = z.amax(dim=2, keepdim=True)
            p = z.sub_(zmax).exp_()
            s = p.sum(dim=2, keepdim=True)
            lse = (s.log() + zmax).mul_(w)  # w: [L, n, 1, m]
        else:
            p = z.exp_()
            s = p.sum(dim=2, keepdim=True)
            lse = s.log().mul_(w)
        f = lse.sum(dim=(1, 2)) - _dot(th, G0c) + 0.5 * _dot(regc * th, th)
        R = p.mul_(w / s).view(L, n, K * m)
        g = torch.bmm(XaT, R).view(L, D, K, m).permute(0, 3, 1, 2) - G0c
        return f, g + regc * th

    theta = torch.zeros(L, M, D, K, dtype=dt) if theta0 is None else theta0.clone()
    f, g = fg(theta, torch.arange(M))
    S = torch.zeros(history, L, M, D, K, dtype=dt)
    Yh = torch.zeros_like(S)
    rho = torch.zeros(history, L, M, dtype=dt)
    gamma = torch.ones(L, M, dtype=dt)
    active = g.abs().amax(dim=(-1, -2)) > tol
    out, where = torch.empty_like(theta), torch.arange(M)  # solutions; their columns
    stored, it = 0, 0
    for it in range(1, max_iter + 1):  # noqa: B007 (it is returned)
        live = active.any(dim=0)
        n_live = int(live.sum())
        if n_live == 0:
            break
        if n_live <= M // 2:
            # Most problems have converged: drop them from every tensor (fg reads the
            # rebound names), so the stragglers' iterations cost only their own share.
            keep = torch.nonzero(live).squeeze(1)
            out[:, where] = theta
            where, M = where[keep], n_live
            theta, f, g, gamma, active = (x[:, keep] for x in (theta, f, g, gamma, active))
            S, Yh, rho = S[:, :, keep], Yh[:, :, keep], rho[:, :, keep]
            weights, G0, reg_mat, bias_km = (
                weights[:, :, keep], G0[:, keep], reg_mat[:, keep], bias_km[:, keep])  # fmt: skip
        # Two-loop recursion, vectorised over problems; empty slots have rho = 0.
        order = [(stored - 1 - j) % history for j in range(min(stored, history))]
        q, alphas = g.clone(), {}
        for j in order:
            alphas[j] = rho[j] * _dot(S[j], q)
            q -= alphas[j][..., None, None] * Yh[j]
        r = gamma[..., None, None] * q
        for j in reversed(order):
            beta = rho[j] * _dot(Yh[j], r)
            r += S[j] * (alphas[j] - beta)[..., None, None]
        direc = -r
        gd = _dot(g, direc)
        uphill = gd >= 0  # lost curvature information: fall back to steepest descent
        direc = torch.where(uphill[..., None, None], -g, direc) * active[..., None, None]
        gd = torch.where(uphill, -_dot(g, g), gd)
        t = torch.ones(L, M, dtype=dt)
        if stored == 0:  # first step of length 1 in parameter space, as scipy's L-BFGS-B
            t = torch.clamp(1.0 / _dot(g, g).sqrt().clamp_min(eps), max=1.0)
        # Backtracking (Armijo) line search with a step per problem; only problems still
        # searching (and, in any layer, still active) are evaluated.
        new_theta, f_new, g_new = theta.clone(), f.clone(), g.clone()
        ok = ~active
        for _ in range(25):
            cols = torch.nonzero((~ok).any(dim=0)).squeeze(1)
            trial = theta[:, cols] + t[:, cols, None, None] * direc[:, cols]
            new_theta[:, cols] = trial
            fc, gc = fg(new_theta, cols)
            okc = (fc <= f[:, cols] + 1e-4 * t[:, cols] * gd[:, cols]) | ok[:, cols]
            f_new[:, cols] = torch.where(okc, fc, f_new[:, cols])
            g_new[:, cols] = torch.where(okc[..., None, None], gc, g_new[:, cols])
            ok[:, cols] = okc
            if bool(ok.all()):
                break
            t = torch.where(ok, t, 0.5 * t)
        new_theta = torch.where(ok[..., None, None], new_theta, theta)
        s, y = new_theta - theta, g_new - g
        sy, yy = _dot(s, y), _dot(y, y)
        good = sy > eps * yy.clamp_min(eps)
        slot = stored % history
        S[slot] = s * good[..., None, None]
        Yh[slot] = y * good[..., None, None]
        rho[slot] = torch.where(good, 1.0 / sy.clamp_min(eps), torch.zeros_like(sy))
        gamma = torch.where(good, sy / yy.clamp_min(eps), gamma)
        stored += 1
        # Stop a problem at small gradient, a failed line search, or a relative decrease
        # the dtype can no longer resolve (float32 rounding, not progress, below that).
        tiny = (f - f_new) <= 10 * eps * torch.maximum(f.abs(), torch.ones_like(f))
        theta, f, g = new_theta, f_new, g_new
        active &= (g.abs().amax(dim=(-1, -2)) > tol) & ok & ~tiny
    out[:, where] = theta
    return out, it


@dataclass
class BatchedLogisticFit:
    """Probes for every (layer, task), fitted by :func:`fit_logistic_batched`.

    Attributes:
        classes: per task, ``Int[ndarray, "n_classes_t"]`` labels (class index -> label).
        mean, scale: ``Float[Tensor, "n_layers d_model"]`` standardisation.
        coef: ``Float[Tensor, "n_layers n_tasks n_classes d_model"]`` (standardised space;
            padding classes, beyond a task's own, are zero).
        intercept: ``Float[Tensor, "n_layers n_tasks n_classes"]``.
        C: ``Float[ndarray, "n_layers n_tasks"]`` chosen C.
        cv_scores: ``Float[ndarray, "n_layers n_tasks n_Cs"]`` mean inner-CV accuracy.
        n_iter: L-BFGS iterations the whole batch took.
    """

    classes: list[np.ndarray]
    mean: torch.Tensor
    scale: torch.Tensor
    coef: torch.Tensor
    intercept: torch.Tensor
    C: np.ndarray
    cv_scores: np.ndarray
    n_iter: int

    def _class_bias(self) -> torch.Tensor:
        K = self.coef.shape[2]
        have = torch.tensor([[k < len(c) for k in range(K)] for c in self.classes])
        return torch.where(have, 0.0, _MASKED).to(self.coef.dtype)

    def directions(self) -> torch.Tensor:
        """``Float[Tensor, "n_layers n_tasks n_classes d_model"]`` weights in input space."""
        return self.coef / self.scale[:, None, None, :]

    def decision(self, X) -> torch.Tensor:
        """Scores ``Float[Tensor, "n_layers n_tasks n_examples n_classes"]`` for ``X:
        [n_layers, n_examples, d_model]``; padding classes score -1e30."""
        X = torch.as_tensor(X, dtype=self.coef.dtype)
        Z = (X - self.mean[:, None]) / self.scale[:, None]
        out = torch.einsum("lnd,ltkd->ltnk", Z, self.coef) + self.intercept[:, :, None]
        return out + self._class_bias()[None, :, None]

    def predict(self, X) -> np.ndarray:
        """Predicted labels ``Int[ndarray, "n_layers n_tasks n_examples"]``."""
        idx = self.decision(X).argmax(-1).numpy()
        table = np.full((len(self.classes), self.coef.shape[2]), -1, dtype=np.int64)
        for t, c in enumerate(self.classes):
            table[t, : len(c)] = c
        return np.take_along_axis(table[None, :, :], idx.reshape(idx.shape[0], len(table), -1),
                                  axis=2)  # fmt: skip


def fit_logistic_batched(
    X,
    y,
    groups,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    cv: int = 4,
    cv_tolerance: float = DEFAULT_CV_TOLERANCE,
    max_iter: int = 1000,
    tol: float = 1e-4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> BatchedLogisticFit:
    """Fit logistic probes for every layer and task in one batched optimisation.

    Args:
        X: ``Float[Tensor | ndarray, "n_layers n_examples d_model"]`` training activations,
            one slice per layer (or hook) of the same examples.
        y: ``Int[ndarray, "n_tasks n_examples"]`` labels per task (e.g. rationale arm,
            action, a control task); -1 = missing, that row is left out of that task.
        groups: ``Int[ndarray, "n_examples"]`` episode ids (inner folds are whole episodes).
        Cs, cv, cv_tolerance, max_iter, tol, seed: as
            :class:`kdgap.probes.estimators.LogisticProbe`.
        dtype: compute dtype (float32 agrees with scikit-learn's float64 within 1 point
            of accuracy, see the tests; float64 is ~2x slower).

    Returns:
        :class:`BatchedLogisticFit`.
    """
    X = torch.as_tensor(np.asarray(X) if not torch.is_tensor(X) else X).to(dtype)
    if X.ndim != 3:
        raise ValueError(f"X must be [n_layers, n_examples, d_model]; got shape {tuple(X.shape)}.")
    L, n, d = X.shape
    y = np.atleast_2d(np.asarray(y, dtype=np.int64))
    if y.shape[1] != n:
        raise ValueError(f"y has {y.shape[1]} examples per task but X has {n}; align them.")
    mean = X.mean(dim=1)
    scale = X.std(dim=1, unbiased=False)
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    Xa = torch.cat([(X - mean[:, None]) / scale[:, None], torch.ones(L, n, 1, dtype=dtype)], -1)

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
    Xf = Xa[:, torch.as_tensor(idx)].reshape(L * F, nf, d + 1)
    wf = weights[idx, :, np.arange(F)[:, None]]  # [F, nf, T]
    wf[pad] = 0.0  # padding rows (copies of row 0) carry no weight
    wf = torch.tensor(wf, dtype=dtype).repeat(L, 1, 1)
    Yf = torch.tensor(Yoh[idx], dtype=dtype).repeat(L, 1, 1, 1)  # [L * F, nf, T, K]
    bf = torch.tensor(bias, dtype=dtype)
    thetas, n_iter, theta = [], 0, None
    for C in Cs:
        reg = binary[None, :] / (C * n_rows[:, :F].T)  # [F, T]
        reg_t = torch.tensor(reg, dtype=dtype).repeat(L, 1)  # [L * F, T]
        theta, it = lbfgs_softmax(Xf, Yf, wf, reg_t, bf, theta0=theta, max_iter=max_iter,
                                  tol=tol)  # fmt: skip
        thetas.append(theta.view(L, F, T, d + 1, K).transpose(1, 2))
        n_iter += it
    theta = torch.stack(thetas, dim=2)  # [L, T, nC, F, d + 1, K]

    # Inner-CV accuracy: mean over folds of each fold's validation accuracy (as sklearn),
    # scoring each fold's fits on that fold's held-out rows only.
    cv_scores = np.zeros((L, T, nC))
    bias_t = torch.tensor(bias, dtype=dtype)[:, None]  # [T, 1, K]
    for f in range(F):
        rows = np.unique(np.concatenate([vals[t][f] for t in range(T)]))
        W = theta[:, :, :, f].permute(0, 3, 1, 2, 4).reshape(L, d + 1, T * nC * K)
        logits = torch.bmm(Xa[:, torch.as_tensor(rows)], W).view(L, len(rows), T, nC, K)
        pred = (logits + bias_t).argmax(-1).numpy()  # [L, rows, T, nC]
        for t in range(T):
            at = np.searchsorted(rows, vals[t][f])
            hit = pred[:, at, t, :] == enc[t][vals[t][f]][None, :, None]
            cv_scores[:, t] += hit.mean(axis=1) / cv
    best = select_C(cv_scores, tolerance=cv_tolerance)
    C_best = np.asarray(Cs)[best]  # [L, T]

    # Refit each (layer, task) at its chosen C on all its rows, warm-started from the mean
    # of that C's fold solutions (scikit-learn's refit does the same).
    Yr, wr = torch.tensor(Yoh, dtype=dtype), torch.tensor(weights[:, :, F], dtype=dtype)
    pick = theta[torch.arange(L)[:, None], torch.arange(T)[None, :], torch.as_tensor(best)]
    reg = binary[None, :] / (C_best * n_rows[None, :, F])  # [L, T]
    chosen, it = lbfgs_softmax(Xa, Yr, wr, torch.tensor(reg, dtype=dtype), bf,
                               theta0=pick.mean(dim=2), max_iter=max_iter, tol=tol)  # fmt: skip
    n_iter += it
    return BatchedLogisticFit(
        classes=classes, mean=mean, scale=scale,
        coef=chosen[..., :d, :].transpose(-1, -2).contiguous(),
        intercept=chosen[..., d, :].contiguous(),
        C=C_best, cv_scores=cv_scores, n_iter=n_iter,
    )  # fmt: skip
