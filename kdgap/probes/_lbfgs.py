"""The solver behind :mod:`kdgap.probes.batched`: batched L-BFGS in whitened coordinates.

:func:`lbfgs_softmax` minimises many independent L2-regularised softmax regressions at
once over one stacked weight tensor ``[n_layers, n_models, d + 1, n_classes]``, so a
solver step is two wide ``bmm`` calls. The problems are independent, so it keeps a
separate L-BFGS history, step size and stopping test per problem and drops converged
problems from the stack: stacking changes the speed, not the solution.

**Whitened coordinates.** Residual-stream features are strongly correlated, so in the
standardised coordinates the objective is badly conditioned: plain L-BFGS (scikit-learn's
included) needs hundreds of iterations on nearly separable labels and, at scikit-learn's
default ``max_iter=1000``, often stops short of the optimum. Every solve therefore runs
in whitened coordinates of its layer (:func:`whitening`): with ``mu`` the training rows'
mean and ``Q diag(lam) Q^T`` their covariance (float64), ``u = (z - mu) Q lam^(-1/2)``,
``W = Q lam^(-1/2) V`` and ``b = b' - mu W`` (:func:`whitened_inputs`,
:func:`from_whitened`). This is an exact reparametrisation (the penalty becomes
``sum_j ||V_j||^2 / (2 C n lam_j)``, still diagonal, :func:`whitened_penalty`; directions
without variance keep ``W`` at 0, where the optimum has it), so the minimiser is the same
and only the path to it is shorter. In these coordinates the data term's curvature is at
most about 1/2 in every direction (Boehning's bound on the softmax Hessian), which gives
L-BFGS a diagonal initial Hessian ``1 / (c + penalty_j)`` that already matches the
problem's scales. ``tests/probes/test_batched.py`` checks the optimum on ill-conditioned,
rank-deficient features.
"""

from __future__ import annotations

import torch
from jaxtyping import Float

#: Bounds of the data-curvature estimate ``c`` in the preconditioner ``1 / (c + penalty)``:
#: 1/2 is Boehning's bound in whitened coordinates; the floor keeps a step on a nearly
#: flat (saturated) direction from overshooting into a long backtracking search.
_CURVATURE = (0.05, 0.5)
#: Whitening drops covariance eigenvalues below this fraction of the largest (no variance).
_RANK_TOL = 1e-10


def _dot(
    a: Float[torch.Tensor, "L M D K"], b: Float[torch.Tensor, "L M D K"]
) -> Float[torch.Tensor, "L M"]:
    """Per-problem inner product of ``[L, M, D, K]`` tensors -> ``[L, M]``."""
    return (a * b).sum(dim=(-1, -2))


@torch.no_grad()
def lbfgs_softmax(
    Xa: Float[torch.Tensor, "n_layers n_examples d_plus_1"],
    Yoh: Float[torch.Tensor, "*layers n_examples n_models n_classes"],
    weights: Float[torch.Tensor, "*layers n_examples n_models"],
    reg: Float[torch.Tensor, "..."],
    class_bias: Float[torch.Tensor, "n_models n_classes"],
    *,
    theta0: Float[torch.Tensor, "n_layers n_models d_plus_1 n_classes"] | None = None,
    max_iter: int = 1000,
    tol: float = 1e-5,
    history: int = 10,
) -> tuple[Float[torch.Tensor, "n_layers n_models d_plus_1 n_classes"], int]:
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


def whitening(
    Z: Float[torch.Tensor, "batch n_examples d"],
) -> tuple[
    Float[torch.Tensor, "batch d"], Float[torch.Tensor, "batch d d"], Float[torch.Tensor, "batch d"]
]:
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


def whitened_inputs(
    Z: Float[torch.Tensor, "batch n d"],
    mu: Float[torch.Tensor, "batch d"],
    Q: Float[torch.Tensor, "batch d d"],
    lam: Float[torch.Tensor, "batch d"],
    dtype: torch.dtype,
) -> Float[torch.Tensor, "batch n d_plus_1"]:
    """``[(Z - mu) Q lam^-1/2, 1]`` in ``dtype``; dropped directions are zero columns."""
    inv_sqrt = torch.where(lam > 0, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
    U = ((Z - mu[:, None]) @ Q) * inv_sqrt[:, None, :]
    return torch.cat([U, torch.ones(*U.shape[:2], 1, dtype=U.dtype)], dim=-1).to(dtype)


def whitened_penalty(
    reg: Float[torch.Tensor, "batch n_models"], lam: Float[torch.Tensor, "batch d"]
) -> Float[torch.Tensor, "batch n_models d_plus_1"]:
    """Per-coordinate L2 strength ``[B, M, d + 1]`` of ``V`` for per-problem ``reg [B, M]``:
    ``reg / lam_j`` (a dropped direction keeps ``reg``: its column is zero, so it stays 0),
    0 on the bias."""
    inv = torch.where(lam > 0, 1.0 / lam.clamp_min(1e-300), torch.ones_like(lam))
    inv = torch.cat([inv, torch.zeros(len(lam), 1, dtype=lam.dtype)], dim=-1)  # [B, d + 1]
    return reg[:, :, None] * inv[:, None, :]


def from_whitened(
    theta: Float[torch.Tensor, "batch n_models d_plus_1 n_classes"],
    mu: Float[torch.Tensor, "batch d"],
    Q: Float[torch.Tensor, "batch d d"],
    lam: Float[torch.Tensor, "batch d"],
) -> Float[torch.Tensor, "batch n_models d_plus_1 n_classes"]:
    """``[B, M, d + 1, K]`` whitened ``(V, b')`` -> standardised ``(W, b)``, float64."""
    d = mu.shape[-1]
    V = theta.double()
    inv_sqrt = torch.where(lam > 0, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
    W = Q[:, None] @ (inv_sqrt[:, None, :, None] * V[:, :, :d])  # [B, M, d, K]
    b = V[:, :, d] - (mu[:, None, None, :] @ W).squeeze(-2)
    return torch.cat([W, b[:, :, None]], dim=2)
