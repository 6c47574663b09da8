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

**Whitened coordinates.** Residual-stream features are strongly correlated, so in the
standardised coordinates the objective is badly conditioned: plain L-BFGS (scikit-learn's
included) needs hundreds of iterations on nearly separable labels and, at scikit-learn's
default ``max_iter=1000``, often stops short of the optimum. Every solve here therefore
runs in whitened coordinates of its layer: with ``mu`` the training rows' mean and
``Q diag(lam) Q^T`` their covariance (float64), ``u = (z - mu) Q lam^(-1/2)``,
``W = Q lam^(-1/2) V`` and ``b = b' - mu W``. This is an exact reparametrisation (the
penalty becomes ``sum_j ||V_j||^2 / (2 C n lam_j)``, still diagonal; directions without
variance keep ``W`` at 0, where the optimum has it), so the minimiser is the same and only
the path to it is shorter. Fold problems use their layer's map too (any invertible map is
exact; a fold's rows come out whitened up to sampling noise). In these coordinates the
data term's curvature is at most about 1/2 in every direction (Boehning's bound on the
softmax Hessian), which gives L-BFGS a diagonal initial Hessian ``1 / (c + penalty_j)``
that already matches the problem's scales. On the faithful organism's sweep this takes
~5x fewer iterations than the same solver in standardised coordinates and lands within
float32 resolution of the float64 optimum; ``tests/probes/test_batched.py`` checks the
optimum on ill-conditioned, rank-deficient features, and agreement with scikit-learn
within 1 point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kdgap.probes.estimators import DEFAULT_CS, DEFAULT_CV_TOLERANCE, select_C
from kdgap.probes.splits import grouped_folds

_MASKED = -1e30  # logit given to padding classes a task does not have
#: Bounds of the data-curvature estimate ``c`` in the preconditioner ``1 / (c + penalty)``:
#: 1/2 is Boehning's bound in whitened coordinates; the floor keeps a step on a nearly
#: flat (saturated) direction from overshooting into a long backtracking search.
_CURVATURE = (0.05, 0.5)
#: Whitening drops covariance eigenvalues below this fraction of the largest (no variance).
_RANK_TOL = 1e-10


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
    tol: float = 1e-5,
    history: int = 10,
) -> tuple[torch.Tensor, int]:
    """Minimise many independent L2-regularised softmax regressions by batched L-BFGS.

    Problem ``m`` at layer ``l`` minimises
    ``sum_i weights[i, m] CE_i + 1/2 sum_j reg[l, m, j] ||theta[l, m, j]||^2``.

    The initial inverse Hessian of every L-BFGS step is the diagonal
    ``1 / (c + reg[l, m, j])``, with ``c`` the data term's curvature along the last step
    (clamped to ``_CURVATURE``). It fits inputs whose columns are whitened (weighted
    covariance ~ identity, as :func:`fit_logistic_batched` passes them), where the data
    curvature is at most 1/2 in any direction; other inputs still converge, more slowly.

    Args:
        Xa: ``Float[Tensor, "n_layers n_examples d_plus_1"]`` inputs with a trailing
            column of ones (the bias; not penalised).
        Yoh: ``Float[Tensor, "n_examples n_models n_classes"]`` one-hot targets, or
            ``[n_layers, n_examples, n_models, n_classes]`` when they differ per layer.
        weights: ``Float[Tensor, "n_examples n_models"]`` row weights, each column summing
            to 1 over that problem's training rows (0 elsewhere); or
            ``[n_layers, n_examples, n_models]``.
        reg: L2 strength per coordinate, ``Float[Tensor, "n_layers n_models d_plus_1"]``;
            or one per problem, ``[n_models]`` or ``[n_layers, n_models]`` (e.g.
            ``1 / (C n)``), applied to every coordinate but the bias.
        class_bias: ``Float[Tensor, "n_models n_classes"]`` 0, or a huge negative value
            for padding classes.
        theta0: ``Float[Tensor, "n_layers n_models d_plus_1 n_classes"]`` warm start
            (zeros if None).
        max_iter: iteration limit. tol: stop a problem when max |gradient| <= tol; it
            also stops when a line search fails or the objective's relative decrease
            falls below what the dtype resolves.
        history: L-BFGS memory.

    Returns:
        ``(theta, n_iter)``: ``Float[Tensor, "n_layers n_models d_plus_1 n_classes"]``.
    """
    L, n, D = Xa.shape
    M, K = class_bias.shape
    dt = Xa.dtype
    eps = torch.finfo(dt).eps
    if reg.ndim <= 2:
        penal = torch.ones(D, dtype=dt)
        penal[-1] = 0.0
        reg_mat = (reg.to(dt).expand(L, M)[..., None] * penal)[..., None]  # [L, M, D, 1]
    else:
        reg_mat = reg.to(dt).expand(L, M, D)[..., None].contiguous()
    c_lo, c_hi = _CURVATURE
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

    theta = torch.zeros(L, M, D, K, dtype=dt) if theta0 is None else theta0.to(dt).clone()
    f, g = fg(theta, torch.arange(M))
    # L-BFGS pairs, newest last (at most ``history``); a pair a problem rejected is zero
    # for it (rho = 0), so it drops out of that problem's recursion.
    S: list[torch.Tensor] = []
    Yh: list[torch.Tensor] = []
    rho: list[torch.Tensor] = []
    curv = torch.full((L, M), c_hi, dtype=dt)  # data curvature along the last step
    active = g.abs().amax(dim=(-1, -2)) > tol
    out = torch.empty_like(theta)  # solutions, at [where_l, where_m]
    where_l, where_m = torch.arange(L), torch.arange(M)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (it is returned)
        live_l, live_m = active.any(dim=1), active.any(dim=0)
        n_l, n_m = int(live_l.sum()), int(live_m.sum())
        if n_m == 0:
            break
        if n_m <= M // 2 or n_l <= L // 2:
            # Most problems of some tasks or of some layers have converged: drop those
            # columns / layers from every tensor (fg reads the rebound names), so the
            # stragglers' iterations cost only their own share of the data passes.
            out[where_l[:, None], where_m] = theta
            kl, km = torch.nonzero(live_l).squeeze(1), torch.nonzero(live_m).squeeze(1)
            where_l, where_m, L, M = where_l[kl], where_m[km], n_l, n_m

            theta, f, g, curv, active, G0, reg_mat = (
                x[kl][:, km] for x in (theta, f, g, curv, active, G0, reg_mat))  # fmt: skip
            S, Yh, rho = ([x[kl][:, km] for x in h] for h in (S, Yh, rho))
            Xa, XaT, xa_max, bias_km = Xa[kl], XaT[kl], xa_max[kl], bias_km[:, km]
            weights = weights[kl][:, :, km]
        # Two-loop recursion, vectorised over problems.
        h0 = 1.0 / (curv[..., None, None] + reg_mat)  # [L, M, D, 1] diagonal H0
        order = range(len(S) - 1, -1, -1)  # newest first
        q, alphas = g.clone(), {}
        for j in order:
            alphas[j] = rho[j] * _dot(S[j], q)
            q -= alphas[j][..., None, None] * Yh[j]
        r = h0 * q
        for j in reversed(order):
            beta = rho[j] * _dot(Yh[j], r)
            r += S[j] * (alphas[j] - beta)[..., None, None]
        direc = -r
        gd = _dot(g, direc)
        # Lost curvature information: fall back to the preconditioned gradient.
        uphill = gd >= 0
        direc = torch.where(uphill[..., None, None], -h0 * g, direc) * active[..., None, None]
        gd = torch.where(uphill, -_dot(g, h0 * g), gd)
        t = torch.ones(L, M, dtype=dt)
        # Backtracking (Armijo) line search with a step per problem; only problems still
        # searching (and, in any layer, still active) are evaluated. A problem gives up
        # (and stops) once the decrease its step promises is below the dtype's resolution
        # of its objective: no step it could take would show as progress.
        resolution = 10 * eps * torch.maximum(f.abs(), torch.ones_like(f))
        new_theta, f_new, g_new = theta.clone(), f.clone(), g.clone()
        ok = ~active
        searching = active & (-gd > resolution)
        for _ in range(30):
            if not bool(searching.any()):
                break
            cols = torch.nonzero(searching.any(dim=0)).squeeze(1)
            trial = theta[:, cols] + t[:, cols, None, None] * direc[:, cols]
            new_theta[:, cols] = trial
            fc, gc = fg(new_theta, cols)
            okc = (fc <= f[:, cols] + 1e-4 * t[:, cols] * gd[:, cols]) & searching[:, cols]
            f_new[:, cols] = torch.where(okc, fc, f_new[:, cols])
            g_new[:, cols] = torch.where(okc[..., None, None], gc, g_new[:, cols])
            ok[:, cols] |= okc
            searching[:, cols] &= ~okc
            t = torch.where(searching, 0.5 * t, t)
            searching &= -t * gd > resolution
        new_theta = torch.where(ok[..., None, None], new_theta, theta)
        s, y = new_theta - theta, g_new - g
        sy, yy, ss = _dot(s, y), _dot(y, y), _dot(s, s)
        good = sy > eps * yy.clamp_min(eps)
        if len(S) == history:
            del S[0], Yh[0], rho[0]
        S.append(s * good[..., None, None])
        Yh.append(y * good[..., None, None])
        rho.append(torch.where(good, 1.0 / sy.clamp_min(eps), torch.zeros_like(sy)))
        # The penalty's curvature is known exactly; what the step measured beyond it is
        # the data term's.
        data_curv = (sy - _dot(reg_mat * s, s)) / ss.clamp_min(eps)
        curv = torch.where(good, data_curv.clamp(c_lo, c_hi), curv)
        # Stop a problem at small gradient, a failed line search, or a relative decrease
        # the dtype can no longer resolve (float32 rounding, not progress, below that).
        tiny = (f - f_new) <= resolution
        theta, f, g = new_theta, f_new, g_new
        active &= (g.abs().amax(dim=(-1, -2)) > tol) & ok & ~tiny
    out[where_l[:, None], where_m] = theta
    return out, it


def whitening(Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whitening of each batch's rows: the map to the solver's coordinates.

    Args:
        Z: ``Float[Tensor, "batch n_examples d"]`` (float64 recommended).

    Returns:
        ``(mu, Q, lam)``: mean ``[batch, d]``, covariance eigenvectors ``[batch, d, d]``
        and eigenvalues ``[batch, d]``, the latter set to 0 for directions without
        variance (below ``_RANK_TOL`` of the largest), which the whitened inputs leave out.
    """
    mu = Z.mean(dim=1)
    Zc = Z - mu[:, None]
    lam, Q = torch.linalg.eigh(Zc.transpose(1, 2) @ Zc / Z.shape[1])
    lam = torch.where(lam > _RANK_TOL * lam.amax(dim=-1, keepdim=True), lam, torch.zeros_like(lam))
    return mu, Q, lam


def _whitened_inputs(Z, mu, Q, lam, dtype):
    """``[(Z - mu) Q lam^-1/2, 1]`` in ``dtype``; dropped directions are zero columns."""
    inv_sqrt = torch.where(lam > 0, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
    U = ((Z - mu[:, None]) @ Q) * inv_sqrt[:, None, :]
    return torch.cat([U, torch.ones(*U.shape[:2], 1, dtype=U.dtype)], dim=-1).to(dtype)


def _whitened_penalty(reg, lam):
    """Per-coordinate L2 strength ``[B, M, d + 1]`` of ``V`` for per-problem ``reg [B, M]``:
    ``reg / lam_j`` (a dropped direction keeps ``reg``: its column is zero, so it stays 0),
    0 on the bias."""
    inv = torch.where(lam > 0, 1.0 / lam.clamp_min(1e-300), torch.ones_like(lam))
    inv = torch.cat([inv, torch.zeros(len(lam), 1, dtype=lam.dtype)], dim=-1)  # [B, d + 1]
    return reg[:, :, None] * inv[:, None, :]


def _from_whitened(theta, mu, Q, lam):
    """``[B, M, d + 1, K]`` whitened ``(V, b')`` -> standardised ``(W, b)``, float64."""
    d = mu.shape[-1]
    V = theta.double()
    inv_sqrt = torch.where(lam > 0, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
    W = Q[:, None] @ (inv_sqrt[:, None, :, None] * V[:, :, :d])  # [B, M, d, K]
    b = V[:, :, d] - (mu[:, None, None, :] @ W).squeeze(-2)
    return torch.cat([W, b[:, :, None]], dim=2)


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
            (default) reaches the optimum (objective within ~1e-9 on ill-conditioned
            features, see the tests) for a little more time than float32, which stops at
            its resolution (~1e-5 relative there). Largest test-accuracy difference from
            scikit-learn over the faithful organism's sweep: 0.13 points with a float64
            refit, 0.4 with a float32 one.

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
    U64 = _whitened_inputs(Z, mu, Q, lam, refit_dtype)  # [L, n, d + 1]
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
        theta, it = lbfgs_softmax(Uf, Yf, wf, _whitened_penalty(reg, lam_f), bf, theta0=theta,
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
    chosen, it = lbfgs_softmax(U64, Yr, wr, _whitened_penalty(reg, lam), bf.to(refit_dtype),
                               theta0=pick.mean(dim=2), max_iter=max_iter, tol=tol)  # fmt: skip
    n_iter += it
    chosen = _from_whitened(chosen, mu, Q, lam)  # standardised coordinates, float64
    return BatchedLogisticFit(
        classes=classes, mean=mean.to(dtype), scale=scale.to(dtype),
        coef=chosen[..., :d, :].transpose(-1, -2).to(dtype).contiguous(),
        intercept=chosen[..., d, :].to(dtype).contiguous(),
        C=C_best, cv_scores=cv_scores, n_iter=n_iter,
    )  # fmt: skip
