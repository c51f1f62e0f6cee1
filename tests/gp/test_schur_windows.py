"""The variance increase of missing pixels window by window, against the whole grid's exact one."""

import dask
import numpy as np
import pytest
import torch

from hyperspy_gp import memory
from hyperspy_gp.gp import schur_windows
from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.likelihood import solve_grid_icm
from hyperspy_gp.gp.model import GridICMModel
from hyperspy_gp.gp.prediction import GridPosterior, make_posterior
from hyperspy_gp.gp.schur import streamed_increase
from hyperspy_gp.gp.schur_iterative_prediction import SchurCGPosterior, _exact_increase_plan

#: The windows' stated accuracy: relative to each pixel's variance.
WINDOW_RTOL = 1e-6


def _model(shape, lengthscales, noise, fraction, n_tasks=2, seed=0, points=None):
    """A separable model fitted by CG with ``fraction`` of the pixels missing at random, set hyperparameters."""
    observed = np.random.default_rng(seed).random(shape) > fraction
    kernel = GridKernel(shape, points=points)
    model = GridICMModel(kernel, len(lengthscales), n_tasks, rank=1, observed=observed, masked_solver="schur-cg")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(seed), dtype=param.dtype))
        model._set("raw_lengthscale", torch.tensor(lengthscales, dtype=torch.float64))
        model._set("raw_noise", torch.full_like(model.raw_noise, noise))
    return model


def _exact_increase(model, coords):
    """The whole grid's exact increase (:func:`~hyperspy_gp.gp.schur.streamed_increase`)."""
    ell, b, noise = model.lengthscale.detach(), model.task_covariance.detach(), model.noise.detach()
    solve = solve_grid_icm(torch.zeros(model.n_models, *model.kernel.grid_shape, model.n_tasks, dtype=torch.float64),
                           b, noise, model.kernel.factors(ell))
    rotated = [k @ q for k, q in zip(model.kernel.cross_factors(ell, coords), solve.eigenvectors)]
    return streamed_increase(solve, b, model.missing_index, rotated)


def _windowed(model, coords):
    ell = model.lengthscale.detach()
    windows = schur_windows.cut_windows(model.kernel.points, model.missing_index, coords, schur_windows.margins(ell))
    increase = schur_windows.windowed_increase(model.kernel, ell, model.task_covariance.detach(),
                                               model.noise.detach(), windows, coords)
    return windows, increase


@pytest.mark.parametrize("lengthscales,noise,fraction", [
    ([[1.0, 1.3]], 0.05, 0.5),  # half the pixels at random
    ([[1.0, 1.3]], 1e-3, 0.5),  # little noise: the slowest decay measured
    ([[0.7, 0.9]], 0.05, 0.9),  # a sparse scan, a tenth of the pixels
    ([[1.0, 0.8], [0.6, 1.2]], 0.2, 0.5),  # two models: the windows fit the longer length scales
])
def test_the_windowed_increase_is_the_exact_one_within_its_tolerance(lengthscales, noise, fraction):
    shape = (60, 56)
    model = _model(shape, lengthscales, noise, fraction)
    coords = [torch.arange(n * 2, dtype=torch.float64) / 2 for n in shape]
    windows, increase = _windowed(model, coords)
    assert len(windows) > 4 and max(np.prod(w.shape) for w in windows) < 0.5 * np.prod(shape)  # truly local
    exact = _exact_increase(model, coords)
    variance = GridPosterior(model, torch.zeros(model.n_models, *shape, 2, dtype=torch.float64)).predict(coords)[1]
    variance = variance + exact
    error = ((increase - exact).abs() / variance).max()
    assert error < WINDOW_RTOL
    assert float(exact.abs().max()) > 0.1 * float(variance.max())  # the increase is not negligible


def test_every_test_point_lies_a_margin_inside_its_window():
    # Scan lines 3 and 4 were not measured: the training points are not 0, 1, ..., n - 1.
    points = [np.r_[0:3, 5:40], np.arange(30)]
    shape = (len(points[0]), 30)
    model = _model(shape, [[1.5, 2.5]], 0.1, 0.3, points=points)
    coords = [torch.linspace(-2.0, 41.0, 87, dtype=torch.float64), torch.arange(60, dtype=torch.float64) / 2]
    margin = schur_windows.margins(model.lengthscale)
    assert margin == [9, 15]  # ⌈6 ℓ_a⌉
    windows = schur_windows.cut_windows(model.kernel.points, model.missing_index, coords, margin)
    owners = [torch.zeros(len(c), dtype=torch.long) for c in coords]
    for window in windows:
        for axis, ((start, stop), test) in enumerate(zip(window.ranges, window.test)):
            owners[axis][test] += 1
            pts = model.kernel.points[axis]
            for t in coords[axis][test]:
                nearest = int((pts - t).abs().argmin())
                assert nearest - start >= margin[axis] or start == 0
                assert stop - 1 - nearest >= margin[axis] or stop == len(pts)
        # The window's missing pixels, in window coordinates, are the model's inside it.
        shift = torch.tensor([start for start, _ in window.ranges])
        inside = [tuple(i) for i in (window.missing + shift).tolist()]
        expected = [tuple(i) for i in model.missing_index.tolist()
                    if all(s <= v < e for v, (s, e) in zip(i, window.ranges))]
        assert sorted(inside) == sorted(expected)
    # Every test coordinate in exactly one core per axis (the cores' windows tile the grid).
    n_cores = [len({w.ranges[a] for w in windows}) for a in range(2)]
    for axis, owner in enumerate(owners):
        assert (owner == len(windows) // n_cores[axis]).all()


def test_the_posterior_takes_the_windows_where_they_are_cheaper(monkeypatch, caplog):
    monkeypatch.setattr(memory, "MAX_SCHUR_ENTRIES", 0)  # no factorised posterior
    shape = (60, 56)
    model = _model(shape, [[1.0, 1.3]], 0.05, 0.5)
    targets = torch.randn(1, *shape, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    coords = [torch.arange(n * 2, dtype=torch.float64) / 2 for n in shape]
    with caplog.at_level("INFO", logger="hyperspy_gp.gp.schur_iterative_prediction"):
        posterior = make_posterior(model, targets, test_coords=coords)
    assert isinstance(posterior, SchurCGPosterior) and posterior.variance_is_exact
    assert "exact, in 16 windows of 6 length scales" in caplog.text
    mean, variance = posterior.predict(coords)
    # The same posterior with the whole grid's streamed increase (windows refused).
    monkeypatch.setattr(memory, "MAX_WINDOW_PIXELS", 0)
    caplog.clear()
    with caplog.at_level("INFO", logger="hyperspy_gp.gp.schur_iterative_prediction"):
        streamed = make_posterior(model, targets, test_coords=coords)
    assert "exact, streamed" in caplog.text
    mean_ref, var_ref = streamed.predict(coords)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-10, atol=1e-12)
    assert float(((variance - var_ref).abs() / var_ref).max()) < WINDOW_RTOL
    chunked = torch.cat([v for _, _, v in posterior.predict_in_chunks(coords, chunk_rows=7)], dim=1)
    torch.testing.assert_close(chunked, variance)
    # Beyond both exact increases' limits, the draws.
    monkeypatch.setattr(memory, "MAX_STREAMED_INCREASE_COST", 0.0)
    assert not make_posterior(model, targets, test_coords=coords).variance_is_exact


def test_beyond_the_exact_increases_shorter_windows_serve_within_their_bound(monkeypatch, caplog):
    # The streamed increase refused, windows of 6, 5 and 4 length scales (896, 780 and
    # 672 pixels here) too large, those of 3 (528) not: they serve, with their bound.
    monkeypatch.setattr(memory, "MAX_SCHUR_ENTRIES", 0)
    monkeypatch.setattr(memory, "MAX_STREAMED_MISSING_SQUARED", 0)
    monkeypatch.setattr(memory, "MAX_WINDOW_PIXELS", 600)
    shape = (60, 56)
    model = _model(shape, [[1.0, 1.3]], 1e-3, 0.5)
    targets = torch.randn(1, *shape, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    coords = [torch.arange(n * 2, dtype=torch.float64) / 2 for n in shape]
    with caplog.at_level("INFO", logger="hyperspy_gp.gp.schur_iterative_prediction"):
        posterior = make_posterior(model, targets, test_coords=coords)
    assert "within 0.01 relative, in 16 windows of 3 length scales" in caplog.text
    assert isinstance(posterior, SchurCGPosterior) and not posterior.variance_is_exact
    assert posterior.window_lengthscales == 3.0 and posterior.n_samples == 0
    mean, variance, error = posterior.predict_with_standard_error(coords)
    grid = GridPosterior(model, torch.zeros(1, *shape, 2, dtype=torch.float64)).predict(coords)[1]
    var_ref = grid + _exact_increase(model, coords)
    assert bool(((variance - var_ref).abs() <= error).all())  # the bound holds at every pixel
    torch.testing.assert_close(error, 1e-2 * variance)
    torch.testing.assert_close(posterior.variance_standard_error(coords), error)
    parts = dask.compute(*posterior.predict_dask(coords, chunk_rows=7, standard_error=True))
    torch.testing.assert_close(torch.as_tensor(parts[2]), error)


def test_windows_that_would_cover_the_grid_leave_it_to_the_streamed_increase(caplog):
    # Length scales of 4 px on 40 × 36: every window is the whole grid, no cheaper.
    shape = (40, 36)
    model = _model(shape, [[4.0, 4.0]], 0.05, 0.5)
    coords = [torch.arange(n, dtype=torch.float64) for n in shape]
    windows = schur_windows.cut_windows(model.kernel.points, model.missing_index, coords, schur_windows.margins(
        model.lengthscale))
    assert all(w.shape == shape for w in windows)
    assert schur_windows.windowed_cost(windows, 2, 1) >= memory.streamed_increase_cost(
        shape, len(model.missing_index), 2, 1, 40 * 36)
    assert _exact_increase_plan(model, coords) == "streamed"


def test_the_non_separable_kernel_gets_no_windows():
    shape = (12, 10)
    observed = np.random.default_rng(0).random(shape) > 0.5
    model = GridICMModel(GridKernel(shape, "matern"), 1, 1, observed=observed, masked_solver="schur-cg")
    assert _exact_increase_plan(model, [torch.arange(n, dtype=torch.float64) for n in shape]) == "streamed"
    with pytest.raises(ValueError, match="separable"):
        schur_windows.windowed_increase(model.kernel, model.lengthscale, model.task_covariance, model.noise, [],
                                        [torch.arange(n, dtype=torch.float64) for n in shape])


@pytest.mark.parametrize("fraction", [0.7, 1.0])
def test_the_observed_side_gives_the_complements_increase(fraction):
    """Where most of a window is missing it factorises its observed pixels instead: the same increase."""
    shape, n_tasks = (12, 10), 3
    a = torch.randn(1, n_tasks, n_tasks, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    b, noise = a @ a.transpose(-1, -2), torch.tensor([[0.05, 0.3, 1.0]], dtype=torch.float64)
    kernel, ell = GridKernel(shape), torch.tensor([[1.5, 2.5]], dtype=torch.float64)
    factors = kernel.factors(ell)
    solve = solve_grid_icm(torch.zeros(1, *shape, n_tasks, dtype=torch.float64), b, noise, factors)
    missing = np.random.default_rng(3).random(shape) < fraction
    coords = [torch.linspace(-1.0, n, 2 * n + 3, dtype=torch.float64) for n in shape]
    cross = kernel.cross_factors(ell, coords)
    complement = streamed_increase(solve, b, torch.tensor(np.argwhere(missing)),
                                   [k @ q for k, q in zip(cross, solve.eigenvectors)])
    observed_side = schur_windows.observed_side_increase(solve, b, torch.tensor(np.argwhere(~missing)),
                                                         factors, cross)
    torch.testing.assert_close(observed_side, complement, rtol=1e-9, atol=1e-12)
    if fraction == 1.0:  # nothing observed: the prior variance, less the complete grid's (dense algebra)
        k_star = torch.kron(cross[0][0], cross[1][0])  # (test, n)
        sigma = torch.kron(torch.kron(factors[0][0], factors[1][0]), b[0]) + torch.kron(torch.eye(120), noise[0].diag())
        for t in range(n_tasks):
            c = torch.kron(k_star, b[0, t][None])  # cov(f_t(x*), y), (test, n·T)
            reduction = (c @ torch.linalg.inv(sigma) * c).sum(-1)
            torch.testing.assert_close(observed_side[0, ..., t].reshape(-1), reduction, rtol=1e-9, atol=1e-12)
