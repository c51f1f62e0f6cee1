"""The iterative path's exact variance, window by window, against dense algebra."""

import itertools
import logging

import dask
import numpy as np
import pytest
import torch

from hyperspy_gp import memory
from hyperspy_gp.gp import window_variance
from hyperspy_gp.gp.iterative_prediction import IterativePosterior
from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.model import GridICMModel
from hyperspy_gp.gp.prediction import make_posterior
from hyperspy_gp.gp.schur_windows import nearest_pixels
from tests.gp.dense_reference import dense_icm

#: The windows' stated accuracy, relative to each pixel's variance.
WINDOW_RTOL = 1e-6


def _model(shape, lengthscale, noise, observed=None, n_models=1, n_tasks=2, kind="matern", seed=0):
    """An iterative-path model with set hyperparameters and random maps."""
    gen = torch.Generator().manual_seed(seed)
    model = GridICMModel(GridKernel(shape, kind), n_models, n_tasks, rank=1 if n_tasks > 1 else 0, iterative=True,
                         observed=observed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
        model._set("raw_lengthscale", torch.tensor(lengthscale, dtype=torch.float64))
        model._set("raw_noise", torch.full_like(model.raw_noise, noise))
    targets = torch.randn(n_models, *shape, n_tasks, generator=gen, dtype=torch.float64)
    return model, targets


def _dense(model, targets, upsampling, observed=None):
    """Dense mean and variance of every model, ``(P, *fine, T)``."""
    results = [dense_icm(targets[p], model.lengthscale[p].detach(), model.task_covariance[p].detach(),
                         model.noise[p].detach(), model.kernel.kind, upsampling=upsampling, observed=observed)[1:]
               for p in range(model.n_models)]
    return [torch.stack(r) for r in zip(*results)]


def _coords(shape, upsampling):
    return [torch.arange(n * upsampling, dtype=torch.float64) / upsampling for n in shape]


def _cluster(shape, corner, size):
    observed = np.ones(shape, dtype=bool)
    observed[corner[0] : corner[0] + size, corner[1] : corner[1] + size] = False
    return observed


@pytest.mark.parametrize("shape,lengthscale,noise,observed,n_models,n_tasks", [
    ((40, 40), [[0.6, 0.7]], 1e-3, None, 1, 2),  # a complete scan: windows along the edges only
    ((40, 40), [[0.6, 0.5]], 0.05, _cluster((40, 40), (4, 30), 3), 1, 2),  # missing pixels near a corner
    ((40, 40), [[0.6, 0.7]], 1e-3, _cluster((40, 40), (8, 20), 1), 1, 1),  # one in the top edge's strip window
    ((40, 40), [[0.6, 0.7]], 1e-3, _cluster((40, 40), (18, 20), 3), 1, 2),  # inside: the twin's increase
    ((48, 44), [[1.0, 0.8]], 0.05, np.random.default_rng(3).random((48, 44)) > 0.02, 1, 1),  # dead pixels
    ((24, 20), [[1.0, 1.3]], 1e-4, np.random.default_rng(1).random((24, 20)) > 0.1, 1, 2),  # little noise
    ((24, 20), [[1.5, 1.2], [0.7, 0.9]], 0.05, np.random.default_rng(2).random((24, 20)) > 0.3, 2, 1),  # 2 models
])
def test_the_exact_variance_is_the_dense_one_within_its_tolerance(shape, lengthscale, noise, observed, n_models,
                                                                 n_tasks):
    upsampling = 2
    model, targets = _model(shape, lengthscale, noise, observed, n_models, n_tasks)
    coords = _coords(shape, upsampling)
    posterior = IterativePosterior(model, targets, test_coords=coords)
    assert posterior.variance_is_exact and posterior.n_samples == 0
    mean, variance = posterior.predict(coords)
    mean_ref, var_ref = _dense(model, targets, upsampling, observed)
    assert float((mean - mean_ref).abs().max() / mean_ref.abs().max()) < 1e-8
    assert float(((variance - var_ref).abs() / var_ref).max()) < WINDOW_RTOL
    if shape == (40, 40):  # edge windows; the periodic twin's variance inside, exact there too
        windows = posterior._plans[upsampling].windows
        edges = [w for w in windows if isinstance(w, window_variance.EdgeWindow)]
        assert len(edges) == 2**2 - 1  # the 4 corners, the low and high rows, the columns (by reflection)
        # Near the missing pixels: the cores also near an edge (at most 2 here), and the
        # twin's increase at the other test points.
        assert len(windows) - len(edges) <= (0 if observed is None else 2)
        assert (len(posterior._plans[upsampling].twin_points) > 0) == (observed is not None)


def test_one_window_serves_both_ends_of_an_axis_by_reflection():
    # At 3× the test points are not symmetric about the scan's centre (0, 1/3, ...,
    # n − 1/3): the high ends' reflections add a coordinate to the low windows.
    shape, upsampling = (30, 26), 3
    model, targets = _model(shape, [[0.8, 0.6]], 1e-3)
    coords = _coords(shape, upsampling)
    posterior = IterativePosterior(model, targets, test_coords=coords)
    edges = posterior._plans[upsampling].windows
    assert len(edges) == 3 and all(isinstance(w, window_variance.EdgeWindow) for w in edges)
    corner = next(w for w in edges if all(start == 0 for start, _ in w.window.ranges))
    margin = [6, 5]  # ⌈6 ℓ⌉ + 1
    # Low: 0 to m − 2/3 (nearest pixel below m); high reflected: −2/3 to m − 2/3.
    assert [len(c) for c in corner.coordinates] == [upsampling * m + 1 for m in margin]
    assert [float(c.min()) for c in corner.coordinates] == pytest.approx([-2 / 3, -2 / 3])
    var_ref = _dense(model, targets, upsampling)[1]
    assert float(((posterior.predict(coords)[1] - var_ref).abs() / var_ref).max()) < WINDOW_RTOL


@pytest.mark.parametrize("shape,lengthscale,observed,largest_edge,margin,bound", [
    # Edge windows of 6, 5 and 4 length scales (at most 11 × 8 pixels here) taken as
    # too large (and every plan without edge windows), those of 3 (at most 8 × 7) not:
    # they serve, with their bound.
    ((30, 26), [[0.8, 0.6]], None, 60, 3.0, 1e-3),
    ((30, 26), [[0.8, 0.6]], _cluster((30, 26), (13, 11), 3), 60, 3.0, 1e-3),  # inside: the twin's increase
    # Near an edge: the windows of their cores, over clean test points too.
    ((30, 26), [[0.8, 0.6]], _cluster((30, 26), (2, 10), 3), 60, 3.0, 1e-3),
    # Length scales of 3 px and more: a tenth of the bound (windows of 2 length scales,
    # at most 16 × 15 pixels).
    ((40, 36), [[3.2, 3.0]], None, 240, 2.0, 1e-3),
])
def test_where_the_full_margin_is_beyond_its_limits_shorter_windows_serve_within_their_bound(
        monkeypatch, shape, lengthscale, observed, largest_edge, margin, bound):
    upsampling = 2
    model, targets = _model(shape, lengthscale, 1e-4, observed)
    coords = _coords(shape, upsampling)
    fits = window_variance.window_variance_fits

    def small_edges(windows, *args, **kwargs):
        edges = [w for w in windows if isinstance(w, window_variance.EdgeWindow)]
        return bool(edges) and max(np.prod(w.shape) for w in edges) <= largest_edge and fits(windows, *args, **kwargs)

    monkeypatch.setattr(window_variance, "window_variance_fits", small_edges)
    posterior = IterativePosterior(model, targets, test_coords=coords)
    assert posterior.window_lengthscales == margin and posterior.n_samples == 0
    assert not posterior.variance_is_exact and posterior.variance_error_bound == pytest.approx(bound)
    variance, error = posterior.predict(coords)[1], posterior.variance_standard_error(coords)
    var_ref = _dense(model, targets, upsampling, observed)[1]
    relative = (variance - var_ref).abs() / var_ref
    assert float(relative.max()) < bound
    assert bool(((variance - var_ref).abs() <= error).all())  # the reported bound holds at every pixel
    if margin == 3.0:  # deeper inside the scan the periodic twin's variance holds a longer margin's bound
        assert float(error.min() / variance.max()) < 1e-5 < float(relative.max())


def test_length_scales_beyond_the_scan_with_little_noise_are_exact():
    # The hardest case of the draws (test_iterative.py: 32 px on a 12 × 10 scan, B/σ²
    # about 10⁷, where the variance is 10⁻⁷ of the prior): the embedding's spectrum is
    # clipped, so every point is in a window, here the whole scan.
    model, targets = _model((12, 10), [[32.0, 32.0]], 5e-3)
    with torch.no_grad():
        model.task_factor.copy_(torch.tensor([90.0, 440.0], dtype=torch.float64).reshape(1, 2, 1))
    coords = _coords((12, 10), 2)
    variance = IterativePosterior(model, targets, test_coords=coords).predict(coords)[1]
    var_ref = _dense(model, targets, 2)[1]
    assert float((var_ref / model.task_covariance.detach().diagonal(dim1=-2, dim2=-1)[:, None, None]).min()) < 1e-5
    assert float(((variance - var_ref).abs() / var_ref).max()) < WINDOW_RTOL


def test_clean_pixels_have_a_measured_box_inside_the_scan():
    observed = torch.as_tensor(np.random.default_rng(0).random((19, 23)) > 0.02)
    margin = [2, 3]
    clean = window_variance.clean_pixels(observed, margin)
    for i, j in itertools.product(range(19), range(23)):
        inside = i >= 2 and i + 2 < 19 and j >= 3 and j + 3 < 23
        box = observed[max(0, i - 2) : i + 3, max(0, j - 3) : j + 4]
        assert clean[i, j] == (inside and bool(box.all()))


def test_edges_get_strip_windows_missing_pixels_the_twins_increase_or_near_an_edge_their_cores():
    shape, upsampling = (128, 128), 2
    model, _ = _model(shape, [[2.0, 2.0]], 0.05)
    coords = _coords(shape, upsampling)
    margin = 13  # ⌈6 ℓ⌉ + 1
    observed = torch.ones(shape)
    windows = window_variance.plan_exact_variance(model.kernel, model.lengthscale, observed, coords).windows
    assert len(windows) == 3 and all(isinstance(w, window_variance.EdgeWindow) for w in windows)
    assert max(np.prod(w.window.shape) for w in windows) == 2 * margin * (2 * margin + 1)  # the edge strips
    # Every test point within a margin of an edge, and only those, is placed once: the
    # corners by the corner window, the rest of each edge by its axis' strip window.
    nearest = [nearest_pixels(model.kernel.points[a], c) for a, c in enumerate(coords)]
    near = [((n < margin) | (n >= 128 - margin)).to(torch.int64) for n in nearest]
    placed = torch.zeros(len(coords[0]), len(coords[1]), dtype=torch.int64)
    for w in windows:
        placed[torch.meshgrid(*w.targets, indexing="ij")] += 1
    assert torch.equal(placed, near[0][:, None] | near[1][None, :])
    # A missing pixel inside: the test points within a margin of it get the twin's increase.
    observed[64, 64] = 0
    plan = window_variance.plan_exact_variance(model.kernel, model.lengthscale, observed, coords)
    assert len(plan.twin_points) == (2 * 27) ** 2
    assert len(plan.windows) == 3
    # Two near the top edge, at the same place within their cores: 3 cores each, 3 distinct.
    observed[5, 40] = observed[5, 88] = 0
    more = [w for w in window_variance.plan_exact_variance(model.kernel, model.lengthscale, observed, coords).windows
            if not isinstance(w, window_variance.EdgeWindow)]
    assert len(more) == 6
    assert len(window_variance.distinct_windows(more, model.kernel.points, coords)) == 3
    # Every core, where the twin cannot be trusted.
    everywhere = window_variance.plan_exact_variance(model.kernel, model.lengthscale, observed, coords, everywhere=True)
    assert len(everywhere.windows) == 64 and not len(everywhere.twin_points)


def test_beyond_its_limits_or_when_declined_the_variance_is_drawn(monkeypatch, caplog):
    model, targets = _model((24, 20), [[1.0, 1.3]], 0.05)
    coords = _coords((24, 20), 2)
    with caplog.at_level(logging.INFO, logger="hyperspy_gp.gp.iterative_prediction"):
        assert make_posterior(model, targets, test_coords=coords).variance_is_exact
    assert "exact variance" in caplog.text
    declined = make_posterior(model, targets, test_coords=coords, exact_variance=False, n_samples=8)
    assert not declined.variance_is_exact and declined.n_samples == 8
    # Windows costing more than twice the draws they replace are not worth it.
    with monkeypatch.context() as patch:
        patch.setattr(window_variance, "WINDOWS_ALWAYS_AFFORDABLE", 0.0)
        patch.setattr(window_variance, "DRAW_COST_PER_PIXEL", 1e-3)
        assert not make_posterior(model, targets, test_coords=coords).variance_is_exact
    monkeypatch.setattr(memory, "MAX_STREAMED_INCREASE_COST", 0.0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hyperspy_gp.gp.iterative_prediction"):
        drawn = make_posterior(model, targets, test_coords=coords, n_samples=8)
    assert not drawn.variance_is_exact and "beyond its limits" in caplog.text
    assert (drawn.variance_standard_error(coords) > 0).any()


def test_chunks_and_dask_compute_their_rows_as_the_whole_grid_does():
    model, targets = _model((24, 20), [[1.0, 1.3]], 0.05, _cluster((24, 20), (1, 8), 2))
    coords = _coords((24, 20), 2)
    posterior = make_posterior(model, targets, test_coords=coords)
    assert posterior.variance_is_exact
    mean, variance = posterior.predict(coords)
    parts = [torch.as_tensor(x) for x in dask.compute(*posterior.predict_dask(coords, chunk_rows=7))]
    # Each chunk's mean is its own FFT product (a slab of rows around it): equal to rounding.
    torch.testing.assert_close(parts[0], mean, rtol=0, atol=1e-12 * float(mean.abs().max()))
    # The variance is placed from parts computed once: the same numbers.
    torch.testing.assert_close(parts[1], variance, rtol=0, atol=0)
    for start, stop in [(0, 1), (5, 19), (40, 48), (3, 3)]:
        chunk_mean, chunk_var, _ = posterior.rows(2, start, stop)
        assert chunk_var.shape == (1, stop - start, 40, 2)
        torch.testing.assert_close(chunk_var, variance[:, start:stop], rtol=0, atol=0)
        torch.testing.assert_close(chunk_mean, mean[:, start:stop], rtol=0, atol=1e-12 * float(mean.abs().max()))
    # The exact variance's standard error (a rounding floor, one number per map) is a
    # view, not a third upsampled array.
    whole_mean, _, error = posterior.upsampled_maps(2)
    assert error.shape == whole_mean.shape
    assert error.untyped_storage().nbytes() == 8 * model.n_models * 2
    assert torch.equal(posterior.variance_standard_error(coords), error)


def test_default_chunks_are_bounded_and_hold_twice_the_mean_halo(monkeypatch):
    model, targets = _model((60, 20), [[1.0, 1.3]], 0.05)
    coords = _coords((60, 20), 2)
    posterior = make_posterior(model, targets, test_coords=coords)
    halo = posterior.halo
    assert 15 < halo < 25  # Matérn-5/2 falls below 1e-16 of its variance at about 19 length scales
    monkeypatch.setattr("hyperspy_gp.gp.iterative_prediction.DEFAULT_CHUNK_BYTES", 1)
    assert posterior.default_chunk_rows(coords) == 2 * 2 * halo  # upsampled rows
    monkeypatch.setattr("hyperspy_gp.gp.iterative_prediction.DEFAULT_CHUNK_BYTES", 2**40)
    assert posterior.default_chunk_rows(coords) == 120
    drawn = make_posterior(model, targets, test_coords=coords, exact_variance=False, n_samples=2)
    monkeypatch.setattr("hyperspy_gp.gp.iterative_prediction.DEFAULT_CHUNK_BYTES", 1)
    assert drawn.default_chunk_rows(coords) == 120  # the draws' FFTs take whole maps


def test_shorter_windows_bound_every_chunk_as_the_whole_grid(monkeypatch):
    shape, upsampling = (30, 26), 2
    model, targets = _model(shape, [[0.8, 0.6]], 1e-4, _cluster(shape, (2, 10), 3))
    coords = _coords(shape, upsampling)
    fits = window_variance.window_variance_fits

    def small_edges(windows, *args, **kwargs):
        edges = [w for w in windows if isinstance(w, window_variance.EdgeWindow)]
        return bool(edges) and max(np.prod(w.shape) for w in edges) <= 60 and fits(windows, *args, **kwargs)

    monkeypatch.setattr(window_variance, "window_variance_fits", small_edges)
    posterior = IterativePosterior(model, targets, test_coords=coords)
    assert posterior.window_lengthscales == 3.0
    mean, variance, error = posterior.predict_with_standard_error(coords)
    chunks = [torch.as_tensor(x) for x in dask.compute(*posterior.predict_dask(coords, chunk_rows=11,
                                                                                standard_error=True))]
    torch.testing.assert_close(chunks[1], variance, rtol=0, atol=0)
    torch.testing.assert_close(chunks[2], error, rtol=0, atol=0)
    var_ref = _dense(model, targets, upsampling, _cluster(shape, (2, 10), 3))[1]
    assert bool(((chunks[1] - var_ref).abs() <= chunks[2]).all())


def test_the_window_variance_memory_is_counted():
    # The largest window allowed: its Gram matrix, factor and their copy, 3 × 2²⁵ values.
    estimate = memory.estimate_memory((96, 96), 1, 100, upsampling=1, kernel="matern", iterative=True)
    assert estimate.prediction >= 3 * memory.MAX_VARIANCE_WINDOW_SQUARED * 8


def test_line_scans_and_a_domain_around_the_training_grid_are_exact():
    # A line scan with three missing pixels, at 3×.
    observed = np.ones(90, dtype=bool)
    observed[40:43] = False
    model, targets = _model((90,), [[1.5]], 1e-3, observed)
    coords = _coords((90,), 3)
    posterior = IterativePosterior(model, targets, test_coords=coords)
    assert posterior.variance_is_exact
    var_ref = _dense(model, targets, 3, observed)[1]
    assert float(((posterior.predict(coords)[1] - var_ref).abs() / var_ref).max()) < WINDOW_RTOL
    # A box fitted inside a larger scan: the test points beyond it are in windows too.
    box, origin, scan = (30, 27), (2, 0), (33, 31)
    model, targets = _model(box, [[1.0, 1.2]], 1e-2)
    observed = np.zeros(scan, dtype=bool)
    observed[2:32, :27] = True
    full = torch.zeros(1, *scan, 2, dtype=torch.float64)
    full[:, observed] = targets.reshape(1, -1, 2)
    coords = [torch.arange(n * 2, dtype=torch.float64) / 2 - o for n, o in zip(scan, origin)]
    posterior = IterativePosterior(model, targets, domain=(origin, scan), test_coords=coords)
    assert posterior.variance_is_exact
    var_ref = dense_icm(full[0], model.lengthscale[0].detach(), model.task_covariance[0].detach(),
                        model.noise[0].detach(), "matern", upsampling=2, observed=observed)[2]
    assert float(((posterior.predict(coords)[1][0] - var_ref).abs() / var_ref).max()) < WINDOW_RTOL


def test_the_dask_graph_ships_the_variance_parts_computed_once(monkeypatch):
    import pickle

    model, targets = _model((24, 20), [[1.0, 1.3]], 0.05)
    coords = _coords((24, 20), 2)
    posterior = make_posterior(model, targets, test_coords=coords)
    calls = []
    prepare = IterativePosterior._prepare_windowed_variance
    monkeypatch.setattr(IterativePosterior, "_prepare_windowed_variance",
                        lambda self, u: calls.append(u) or prepare(self, u))
    mean, variance = posterior.predict_dask(coords, chunk_rows=9)
    assert calls == [2]  # at the graph's construction
    shipped = pickle.loads(pickle.dumps(posterior))  # what a worker receives
    torch.testing.assert_close(torch.as_tensor(variance.compute()), shipped.predict(coords)[1], rtol=0, atol=0)
    assert calls == [2]  # neither the tasks nor the copy computed them again
