"""Maximum-likelihood training: bounds, convergence reporting, history."""

import warnings

import numpy as np
import pytest
import torch

from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.model import GridICMModel
from hyperspy_gp.gp.training import ConvergenceWarning, fit_model


def _lattice_maps(shape=(20, 20), noise=(0.05, 0.6), seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    truth = np.sin(2 * np.pi * xx / 7) * np.sin(2 * np.pi * yy / 9)
    maps = np.stack([truth + s * rng.standard_normal(shape) for s in noise], -1)
    maps = (maps - maps.mean((0, 1))) / maps.std((0, 1))
    return torch.tensor(maps[None])


@pytest.mark.parametrize("bounds", [(1.0, 1.5), (4.0, 6.0), (None, 1.2), (3.5, None)])
def test_lengthscale_bounds_are_hard(bounds):
    model = GridICMModel(GridKernel((20, 20)), 1, 2, rank=1, lengthscale_bounds=bounds)
    fit_model(model, _lattice_maps())
    ls = model.lengthscale.detach().numpy()
    lo, hi = bounds
    if lo is not None:
        assert (ls >= lo - 1e-9).all()
    if hi is not None:
        assert (ls <= hi + 1e-9).all()


def test_fit_finds_the_lattice_lengthscale_and_orders_the_noise():
    model = GridICMModel(GridKernel((20, 20)), 1, 2, rank=1)
    result = fit_model(model, _lattice_maps())
    assert result.converged
    ls = model.lengthscale.detach().numpy()[0]
    assert (ls > 1.0).all() and (ls < 6.0).all()
    noise = model.noise.detach().numpy()[0]
    assert noise[0] < noise[1]
    assert result.log_likelihood.shape == (1,)


def test_history_records_every_iteration_and_likelihood_increases_overall():
    model = GridICMModel(GridKernel((16, 16)), 2, 1, rank=0)
    targets = _lattice_maps((16, 16))[0].movedim(-1, 0)[..., None]
    result = fit_model(model, targets)
    h = result.history
    n = result.n_iterations + 1
    assert h["lengthscale"].shape == (n, 2, 2)
    assert h["noise"].shape == (n, 2, 1)
    assert h["task_covariance"].shape == (n, 2, 1, 1)
    assert h["log_likelihood"].shape == (n, 2)
    assert h["log_likelihood"][-1].sum() > h["log_likelihood"][0].sum()


def test_iteration_cap_warns_with_gradient_norm():
    model = GridICMModel(GridKernel((16, 16)), 1, 2, rank=1)
    with pytest.warns(ConvergenceWarning, match="gradient norm"):
        result = fit_model(model, _lattice_maps((16, 16)), max_iter=2)
    assert not result.converged
    assert result.n_iterations == 2


def test_isotropic_ties_the_axes():
    model = GridICMModel(GridKernel((16, 20)), 1, 2, rank=1, isotropic=True)
    fit_model(model, _lattice_maps((16, 20)))
    ls = model.lengthscale.detach().numpy()[0]
    assert ls[0] == ls[1]


def test_fit_is_deterministic():
    out = []
    for _ in range(2):
        model = GridICMModel(GridKernel((16, 16)), 1, 2, rank=1)
        fit_model(model, _lattice_maps((16, 16)))
        out.append(model.lengthscale.detach().numpy().copy())
    np.testing.assert_array_equal(out[0], out[1])


def _abnormal_first_run(monkeypatch, max_first_iter):
    """Make the first L-BFGS-B run stop early with an abnormal line search."""
    from hyperspy_gp.gp import training

    real, calls = training._lbfgsb, []

    def lbfgsb(objective, x0, callback, max_iter, tol):
        calls.append(x0.copy())
        if len(calls) == 1:
            res = real(objective, x0, callback, max_first_iter, tol)
            res.success, res.message = False, "ABNORMAL: "
            return res
        return real(objective, x0, callback, max_iter, tol)

    monkeypatch.setattr(training, "_lbfgsb", lbfgsb)
    return calls


def test_abnormal_line_search_restarts_from_where_it_stopped(monkeypatch):
    reference = GridICMModel(GridKernel((16, 16)), 1, 2, rank=1)
    fit_model(reference, _lattice_maps((16, 16)))

    calls = _abnormal_first_run(monkeypatch, max_first_iter=4)
    model = GridICMModel(GridKernel((16, 16)), 1, 2, rank=1)
    result = fit_model(model, _lattice_maps((16, 16)))
    assert len(calls) == 2 and not np.array_equal(calls[0], calls[1])
    assert result.converged and "restart" in result.message
    np.testing.assert_allclose(model.lengthscale.detach().numpy(), reference.lengthscale.detach().numpy(), rtol=1e-3)


def test_abnormal_line_search_at_the_optimum_counts_as_converged(monkeypatch):
    """A restart that cannot lower the objective either: stationary to precision."""
    from hyperspy_gp.gp import training

    real = training._lbfgsb

    def always_abnormal(objective, x0, callback, max_iter, tol):
        res = real(objective, x0, callback, max_iter, tol)
        res.success, res.message = False, "ABNORMAL: "
        return res

    monkeypatch.setattr(training, "_lbfgsb", always_abnormal)
    model = GridICMModel(GridKernel((16, 16)), 1, 2, rank=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        result = fit_model(model, _lattice_maps((16, 16)))
    assert result.converged and "no decrease" in result.message


def test_models_of_a_batch_are_fitted_as_if_alone():
    """Independent GPs stay independent: a clean map never steers or stops a noisy one."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:24, :24]
    truth = np.sin(2 * np.pi * xx / 8) * np.sin(2 * np.pi * yy / 8)
    maps = np.stack([truth, truth + 2.0 * rng.standard_normal(truth.shape)])
    maps = (maps - maps.mean((1, 2), keepdims=True)) / maps.std((1, 2), keepdims=True)
    targets = torch.tensor(maps[..., None])
    batch = GridICMModel(GridKernel((24, 24)), 2, 1, rank=0)
    result = fit_model(batch, targets)
    alone = GridICMModel(GridKernel((24, 24)), 1, 1, rank=0)
    fit_model(alone, targets[1:])
    np.testing.assert_allclose(batch.lengthscale[1].detach().numpy(), alone.lengthscale[0].detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(batch.noise[1].detach().numpy(), alone.noise[0].detach().numpy(), rtol=1e-10)
    assert result.log_likelihood.shape == (2,)
    assert result.history["lengthscale"].shape[:2] == (result.n_iterations + 1, 2)


@pytest.mark.parametrize(
    ("options", "stochastic"),
    [
        ({}, False),
        ({"iterative": True}, True),
        ({"masked_solver": "schur"}, False),
        ({"masked_solver": "schur-cg"}, True),
        ({"masked_solver": "schur-cg", "n_probes": "exact"}, False),
    ],
)
def test_the_tolerance_stops_at_the_precision_of_a_stochastic_likelihood(monkeypatch, options, stochastic):
    """A probe estimate of the likelihood is fitted to 1e-6, not to the requested 1e-12."""
    from hyperspy_gp.gp import training

    tolerances, real = [], training._lbfgsb

    def recording(objective, x0, callback, max_iter, tol):
        tolerances.append(tol)
        return real(objective, x0, callback, max_iter, tol)

    monkeypatch.setattr(training, "_lbfgsb", recording)
    observed = np.ones((16, 16), dtype=bool)
    observed[3, 5] = observed[10, 2] = False
    model = GridICMModel(GridKernel((16, 16)), 1, 2, rank=1, observed=observed if "masked_solver" in options else None,
                         **options)
    assert model.stochastic_objective is stochastic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit_model(model, _lattice_maps((16, 16)), max_iter=3, tol=1e-12)
    assert tolerances[0] == (training.STOCHASTIC_MIN_TOL if stochastic else 1e-12)


@pytest.mark.parametrize(("n_models", "n_tasks", "rank"), [(1, 2, 1), (2, 1, 0)])
def test_the_fit_evaluates_each_point_once_and_reports_the_final_one(monkeypatch, n_models, n_tasks, rank):
    """The start, SciPy's first call and the final report share one likelihood (each can take a minute)."""
    model = GridICMModel(GridKernel((16, 16)), n_models, n_tasks, rank=rank)
    targets = _lattice_maps((16, 16))
    targets = targets if n_models == 1 else targets[0].movedim(-1, 0)[..., None]
    points, real = [], GridICMModel.log_likelihood

    def recording(self, targets, *args, **kwargs):  # a batch's models share their start: the point and the map
        params = torch.cat([p.detach().flatten() for _, p in sorted(self.named_parameters())])
        points.append(params.numpy().tobytes() + targets.numpy().tobytes())
        return real(self, targets, *args, **kwargs)

    monkeypatch.setattr(GridICMModel, "log_likelihood", recording)
    result = fit_model(model, targets)
    assert result.converged and len(points) > result.n_iterations
    assert len(points) == len(set(points))
    monkeypatch.setattr(GridICMModel, "log_likelihood", real)
    with torch.no_grad():
        final = model.log_likelihood(targets).numpy()
    np.testing.assert_allclose(result.log_likelihood, final, rtol=1e-12)
    np.testing.assert_allclose(result.history["log_likelihood"][-1], final, rtol=1e-12)
