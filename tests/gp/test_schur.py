"""Few missing pixels on a large grid: the Schur-complement path is exact.

Every quantity equals the dense path on the observed pixels (itself checked against
the dense reference in test_missing_pixels.py): likelihood, gradient, mean, variance.
"""

import numpy as np
import pytest
import torch

from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.model import GridICMModel
from hyperspy_gp.gp.prediction import make_posterior
from hyperspy_gp.gp.schur import SchurPosterior
from hyperspy_gp.gp.training import fit_model

RTOL = 1e-8


def _pair(kind, shape, n_models, n_tasks, rank, observed, seed=0):
    """The same random model twice: dense and Schur paths for missing pixels."""
    gen = torch.Generator().manual_seed(seed)
    models = [GridICMModel(GridKernel(shape, kind), n_models, n_tasks, rank=rank, observed=observed,
                           masked_solver=solver) for solver in ("dense", "schur")]
    with torch.no_grad():
        for name, param in models[0].named_parameters():
            param.add_(0.4 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
            getattr(models[1], name).copy_(param)
    targets = torch.randn(n_models, *shape, n_tasks, generator=gen, dtype=torch.float64)
    targets[:, torch.as_tensor(~observed)] = 0.0  # as gp_reconstruct fills NaN
    return models, targets


def _holes(shape, n_missing, seed=0):
    rng = np.random.default_rng(seed)
    observed = np.ones(shape, dtype=bool)
    observed.flat[rng.choice(observed.size, n_missing, replace=False)] = False
    return observed


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


CASES = [("separable", (9, 11), 1, 3, 1), ("separable", (12, 12), 1, 4, 2), ("separable", (10, 8), 3, 1, 0),
         ("matern", (7, 8), 1, 3, 1), ("separable", (17,), 1, 2, 1)]


@pytest.mark.parametrize("kind,shape,n_models,n_tasks,rank", CASES)
def test_likelihood_and_gradient_equal_the_dense_path(kind, shape, n_models, n_tasks, rank):
    (dense, schur), targets = _pair(kind, shape, n_models, n_tasks, rank, _holes(shape, 5))
    grads = []
    for model in (dense, schur):
        mll = model.log_likelihood(targets)
        mll.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if model is dense:
            reference = mll.detach()
    assert _rel(mll.detach(), reference) < RTOL
    for name in grads[0]:
        assert _rel(grads[1][name], grads[0][name]) < 1e-7, name


@pytest.mark.parametrize("kind,shape,n_models,n_tasks,rank", CASES)
def test_mean_and_variance_equal_the_dense_path(kind, shape, n_models, n_tasks, rank):
    (dense, schur), targets = _pair(kind, shape, n_models, n_tasks, rank, _holes(shape, 4, seed=2))
    coords = [dense.kernel.axis_coordinates(n, 2) for n in shape]
    posterior = make_posterior(schur, targets)
    assert isinstance(posterior, SchurPosterior)
    mean, var = posterior.predict(coords)
    ref_mean, ref_var = make_posterior(dense, targets).predict(coords)
    assert _rel(mean, ref_mean) < RTOL
    assert _rel(var, ref_var) < RTOL


def test_chunked_prediction_equals_one_shot():
    (_, schur), targets = _pair("separable", (10, 12), 1, 3, 1, _holes((10, 12), 6))
    posterior = make_posterior(schur, targets)
    coords = [schur.kernel.axis_coordinates(n, 3) for n in (10, 12)]
    mean, var = posterior.predict(coords)
    rows = list(posterior.predict_in_chunks(coords, chunk_rows=7))
    np.testing.assert_allclose(torch.cat([r[1] for r in rows], 1), mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(torch.cat([r[2] for r in rows], 1), var, rtol=1e-12, atol=1e-14)


def test_fits_of_both_paths_agree():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:14, :16]
    truth = np.sin(2 * np.pi * xx / 6) * np.cos(2 * np.pi * yy / 7)
    maps = np.stack([truth + s * rng.standard_normal(truth.shape) for s in (0.1, 0.5)], -1)
    observed = _holes((14, 16), 6, seed=3)
    maps[~observed] = 0.0
    targets = torch.tensor(maps[None])
    states = []
    for solver in ("dense", "schur"):
        model = GridICMModel(GridKernel((14, 16)), 1, 2, rank=1, observed=observed, masked_solver=solver)
        fit_model(model, targets, tol=1e-12)
        states.append(model.state())
    for name in states[0]:
        np.testing.assert_allclose(states[1][name], states[0][name], rtol=1e-4, err_msg=name)


def test_identical_maps_and_repeated_eigenvalues_keep_it_exact():
    # Square grid, equal length scales (every spatial eigenvalue repeated), identical
    # maps and B of rank one: the whitened B's eigenvalue 0 is repeated, Σ_k = I there.
    shape = (8, 8)
    (dense, schur), targets = _pair("separable", shape, 1, 3, 1, _holes(shape, 6, seed=4), seed=5)
    targets = targets[..., :1].expand(*targets.shape[:-1], 3).contiguous()
    with torch.no_grad():
        for model in (dense, schur):
            model.raw_lengthscale.fill_(0.3)
            model.raw_task_variance.fill_(-20.0)  # v at its floor: B ≈ W Wᵀ
    grads, mlls = [], []
    for model in (dense, schur):
        mll = model.log_likelihood(targets)
        mll.sum().backward()
        mlls.append(mll.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert _rel(mlls[1], mlls[0]) < RTOL
    for name in grads[0]:
        assert torch.isfinite(grads[1][name]).all(), name
        assert _rel(grads[1][name], grads[0][name]) < 1e-7, name
    coords = [schur.kernel.axis_coordinates(n, 2) for n in shape]
    mean, var = make_posterior(schur, targets).predict(coords)
    ref_mean, ref_var = make_posterior(dense, targets).predict(coords)
    assert _rel(mean, ref_mean) < RTOL
    assert _rel(var, ref_var) < RTOL


def test_columns_are_one_field_per_missing_pixel_and_whitened_map():
    # One complement per whitened map: H has m fields per map (|M| n T values), not the
    # m T fields per map (|M| n T²) of one complement over all maps.
    shape, n_tasks, n_missing = (9, 10), 4, 5
    (_, schur), targets = _pair("separable", shape, 2, n_tasks, 2, _holes(shape, n_missing))
    posterior = make_posterior(schur, targets)
    assert posterior.columns.shape == (2, *shape, n_tasks, n_missing)


def test_a_fit_by_cg_gets_the_exact_posterior_where_its_columns_fit(monkeypatch):
    from hyperspy_gp import memory
    from hyperspy_gp.gp.schur_iterative_prediction import SchurCGPosterior

    shape = (10, 9)
    (dense, _), targets = _pair("separable", shape, 1, 3, 1, _holes(shape, 7, seed=6), seed=6)
    cg = GridICMModel(GridKernel(shape), 1, 3, rank=1, observed=dense.observed, masked_solver="schur-cg")
    cg.load_state_dict(dense.state_dict())
    coords = [dense.kernel.axis_coordinates(n, 2) for n in shape]
    posterior = make_posterior(cg, targets)
    assert isinstance(posterior, SchurPosterior) and posterior.variance_is_exact
    mean, var = posterior.predict(coords)
    ref_mean, ref_var = make_posterior(dense, targets).predict(coords)
    assert _rel(mean, ref_mean) < RTOL
    assert _rel(var, ref_var) < RTOL
    assert isinstance(make_posterior(cg, targets, exact_variance=False), SchurCGPosterior)  # a memory budget
    monkeypatch.setattr(memory, "MAX_SCHUR_ENTRIES", 7 * 90 * 3 - 1)  # one value short
    posterior = make_posterior(cg, targets)
    assert isinstance(posterior, SchurCGPosterior) and not posterior.variance_is_exact


def test_symmetrised_in_place_block_by_block_equals_the_mean_with_the_transpose():
    from hyperspy_gp.gp.schur import _symmetrised

    matrix = torch.randn(2, 23, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = 0.5 * (matrix + matrix.transpose(-1, -2))
    out = _symmetrised(matrix, 5)  # blocks that do not divide the side, diagonal blocks included
    assert out.data_ptr() == matrix.data_ptr()  # in place: no second matrix
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
