"""The batched torch trainer agrees with scikit-learn on every cell of a sweep."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from kdgap.probes import LogisticProbe, fit_logistic_batched, sweep
from kdgap.probes._lbfgs import from_whitened, whitened_inputs, whitening


def test_batched_matches_sklearn_on_every_cell(bypass_store):
    kw = dict(probes=("logistic",), Cs=(1e-3, 1e-2, 1e-1, 1.0), cv=3, n_boot=50)
    fast = sweep(bypass_store, trainer="batched", **kw)
    ref = sweep(bypass_store, trainer="sklearn", **kw)
    assert len(fast) == len(ref) == 4 * 5  # hooks x labels
    for col in ("accuracy", "control_accuracy"):
        diff = (fast[col] - ref[col]).abs()
        assert diff.max() <= 0.01 + 1e-9, fast.assign(ref=ref[col], diff=diff)[
            ["hook", "label", "diff"]
        ]
    assert (fast["n_train"] == ref["n_train"]).all() and (fast["n_test"] == ref["n_test"]).all()


def test_batched_solution_matches_sklearn_coefficients():
    rng = np.random.default_rng(0)
    n, d = 600, 10
    groups = np.repeat(np.arange(30), 20)
    X = rng.normal(size=(2, n, d))
    y = np.stack([np.argmax(X[0, :, :4] + rng.normal(size=(n, 4)), 1),  # 4 classes
                  (X[1, :, 0] + rng.normal(size=n) > 0).astype(int)])  # binary  # fmt: skip
    y[0, :25] = -1  # missing labels leave rows out of that task only
    fit = fit_logistic_batched(X, y, groups, Cs=(0.01, 0.1), cv=3)
    for layer, task in ((0, 0), (1, 1)):
        ok = y[task] >= 0
        ref = LogisticProbe(Cs=(0.01, 0.1), cv=3).fit(X[layer][ok], y[task][ok], groups[ok])
        assert fit.C[layer, task] == ref.C_
        np.testing.assert_allclose(fit.cv_scores[layer, task], ref.cv_scores_, atol=0.01)
        K = len(ref.classes_)
        coef = fit.coef[layer, task, :K].numpy()
        assert np.abs(coef - ref.coef_).max() < 0.02 * np.abs(ref.coef_).max()
        dirs = fit.directions()[layer, task, :K].numpy()
        np.testing.assert_allclose(dirs, ref.directions_, atol=0.02 * np.abs(dirs).max())
    assert fit.predict(X).shape == (2, 2, n)


def test_batched_errors():
    X = np.zeros((2, 10, 3))
    with pytest.raises(ValueError, match="X must be"):
        fit_logistic_batched(X[0], np.zeros(10), np.arange(10))
    with pytest.raises(ValueError, match="align"):
        fit_logistic_batched(X, np.zeros((1, 9)), np.arange(10))
    with pytest.raises(ValueError, match=">= 2"):
        fit_logistic_batched(X, np.zeros((1, 10)), np.arange(10))


def _objective(Z, y, coef, intercept, C):
    """scikit-learn's multinomial objective: mean CE + ||W||^2 / (2 C n), float64."""
    logits = Z @ coef.T + intercept
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean() + (coef**2).sum() / (2 * C * len(y))


def test_batched_reaches_the_optimum_on_ill_conditioned_features():
    """Correlated features (condition number ~5e4 after standardising), one duplicated
    and one constant: the batched solve lands on the optimum a tightly converged
    scikit-learn finds (scikit-learn at its default tol=1e-4 stops 3e-6 above it)."""
    rng = np.random.default_rng(1)
    n, d = 800, 12
    groups = np.repeat(np.arange(40), 20)
    latent = rng.normal(size=(n, d))
    mix = np.linalg.qr(rng.normal(size=(d, d)))[0] * np.logspace(0, -2.5, d)  # cond ~300
    X = latent @ mix.T
    X = np.hstack([X, X[:, :1], np.full((n, 1), 3.0)])  # rank-deficient: copy + constant
    y = np.argmax(latent[:, :3] * 4 + 0.3 * rng.normal(size=(n, 3)), axis=1)
    C = 1.0
    fit = fit_logistic_batched(X[None], y[None], groups, Cs=(C,), cv=2)
    Z = (X - X.mean(0)) / np.where(X.std(0) > 1e-12, X.std(0), 1.0)
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=100_000).fit(Z, y)
    coef, intercept = fit.coef[0, 0].double().numpy(), fit.intercept[0, 0].double().numpy()
    f_batched = _objective(Z, y, coef, intercept, C)
    f_ref = _objective(Z, y, ref.coef_, ref.intercept_, C)
    assert f_batched <= f_ref + 1e-8, (f_batched, f_ref)  # float64 refit: the optimum
    np.testing.assert_allclose(coef, ref.coef_, atol=0.02 * np.abs(ref.coef_).max())
    assert np.abs(coef[:, -1]).max() < 1e-6  # the constant feature carries no weight
    np.testing.assert_allclose(coef[:, 0], coef[:, d], atol=1e-3 * np.abs(coef).max())


def test_whitened_coordinates_are_a_reparametrisation():
    rng = np.random.default_rng(2)
    Z = torch.tensor(rng.normal(size=(3, 50, 6)) @ rng.normal(size=(6, 6)))
    Z[1, :, 2] = 0.0  # a direction without variance in batch 1
    mu, Q, lam = whitening(Z)
    assert (lam[1] == 0).sum() == 1 and (lam[[0, 2]] > 0).all()
    U = whitened_inputs(Z, mu, Q, lam, torch.float64)
    keep = lam[0] > 0
    cov = U[0, :, :-1][:, keep].T @ U[0, :, :-1][:, keep] / 50
    torch.testing.assert_close(cov, torch.eye(int(keep.sum()), dtype=torch.float64))
    # the same logits in both coordinates
    theta = torch.tensor(rng.normal(size=(3, 2, 7, 4)))
    Za = torch.cat([Z, torch.ones(3, 50, 1, dtype=Z.dtype)], -1)
    W = from_whitened(theta, mu, Q, lam)
    torch.testing.assert_close(
        torch.einsum("bnd,bmdk->bmnk", U, theta), torch.einsum("bnd,bmdk->bmnk", Za, W)
    )
