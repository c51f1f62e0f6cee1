"""Length-scale scan: basins, suggested bounds, lengthscale_bounds="auto"."""

import hyperspy.api as hs
import matplotlib.pyplot as plt
import numpy as np
import pytest

from hyperspy_gp import gp_reconstruct
from hyperspy_gp.lengthscale_scan import (
    LengthscaleScan,
    find_basins,
    lengthscale_scan,
    scan_loading_maps,
    suggest_bounds,
)

#: Length scale (px) of the atomic-scale contrast of the test maps.
ATOMIC_LENGTHSCALE = 3.0
#: Period (px, along the image diagonal) of the long-range modulation.
MODULATION_PERIOD = 20.0
SHAPE = (24, 24)
BOUNDS = np.geomspace(1.0, 16.0, 8)


def _matern52_sample(n: int, lengthscale: float, rng) -> np.ndarray:
    """A 2-D sample of the separable Matérn-5/2 GP (the engine's kernel) of known length scale."""
    r = np.sqrt(5.0) * np.abs(np.subtract.outer(np.arange(n), np.arange(n))) / lengthscale
    k = (1 + r + r**2 / 3) * np.exp(-r) + 1e-8 * np.eye(n)
    chol = np.linalg.cholesky(k)
    return chol @ rng.standard_normal((n, n)) @ chol.T


def _test_maps(noise: float = 0.1, seed: int = 0) -> np.ndarray:
    """``(ny, nx, 2)``: atomic contrast (ℓ = 3 px) × 20 px modulation, and the modulation alone."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    modulation = 0.75 + 0.25 * np.cos(2 * np.pi * (xx + yy) / np.sqrt(2) / MODULATION_PERIOD)
    atomic = (2.0 + _matern52_sample(SHAPE[0], ATOMIC_LENGTHSCALE, rng)) * modulation
    maps = np.stack([atomic, modulation], axis=-1)
    return maps + noise * maps.std(axis=(0, 1)) * rng.standard_normal(maps.shape)


def _signal_with_maps(maps: np.ndarray) -> hs.signals.Signal1D:
    """A spectrum image whose decomposition is exactly ``maps`` with two Gaussian factors."""
    energy = np.arange(40.0)
    factors = np.stack([np.exp(-((energy - c) ** 2) / 20.0) for c in (12.0, 28.0)], axis=1)
    s = hs.signals.Signal1D(np.einsum("yxt,et->yxe", maps, factors))
    s.learning_results.loadings = maps.reshape(-1, maps.shape[-1]).copy()
    s.learning_results.factors = factors
    s.learning_results.decomposition_algorithm = "SVD"
    return s


@pytest.fixture(scope="module")
def scan() -> LengthscaleScan:
    return scan_loading_maps(_test_maps(), upper_bounds=BOUNDS, components=[4, 7], axes_names=["y", "x"])


# ----------------------------------------------------------------- the scan


def test_suggestion_brackets_the_atomic_length_scale(scan):
    lo, hi = scan.suggestion
    assert lo <= ATOMIC_LENGTHSCALE <= hi
    # A bracket, not the whole range: it excludes the modulation's length scales.
    assert hi < 2.5 * ATOMIC_LENGTHSCALE
    np.testing.assert_allclose(scan.basins[0], ATOMIC_LENGTHSCALE, rtol=0.25)


def test_smooth_map_follows_the_bound_past_the_atomic_basin(scan):
    past = BOUNDS > 2 * ATOMIC_LENGTHSCALE
    assert past.any()
    modulation = scan.lengthscales[:, 1]
    # The long-range map keeps asking for more until well past the atomic basin ...
    first_past = np.argmax(past)
    np.testing.assert_allclose(modulation[first_past], BOUNDS[first_past], rtol=0.05)
    # ... while the atomic map has stopped following the bound.
    assert (scan.lengthscales[past, 0] < 0.6 * BOUNDS[past, None]).all()
    assert np.all(np.isnan(scan.basins[1]) | (scan.basins[1] > 2 * ATOMIC_LENGTHSCALE))


def test_every_fit_respects_its_bounds_and_converges(scan):
    assert scan.lengthscales.shape == (len(BOUNDS), 2, 2)
    assert (scan.lengthscales <= BOUNDS[:, None, None] * (1 + 1e-9)).all()
    assert (scan.lengthscales >= scan.lower_bound).all()
    assert scan.converged.all()
    assert scan.components == [4, 7] and scan.axes_names == ["y", "x"]


def test_the_likelihood_never_decreases_as_the_bound_is_relaxed(scan):
    # Warm starts: each fit starts from the previous optimum, which stays feasible.
    assert (np.diff(scan.log_likelihood, axis=0) >= -1e-6 * np.abs(scan.log_likelihood[1:])).all()


def test_a_noise_dominated_map_does_not_set_the_suggestion(scan):
    assert (scan.signal_fraction[-1] > 0.5).all()
    noise = np.random.default_rng(5).standard_normal(SHAPE)
    # A weak short-range signal under stronger noise: a basin finer than the atomic one.
    weak = 0.5 * _matern52_sample(SHAPE[0], 1.2, np.random.default_rng(6)) + noise
    maps = np.concatenate([_test_maps(), weak[..., None]], axis=-1)
    with_noise = scan_loading_maps(maps, upper_bounds=BOUNDS)
    assert (with_noise.basins[2] < 0.5 * ATOMIC_LENGTHSCALE).all()
    assert with_noise.signal_fraction[-1, 2] < 0.45
    assert with_noise.suggestion == pytest.approx(scan.suggestion, rel=0.05)


def test_one_batched_fit_gives_the_per_map_result_on_similar_maps(scan):
    batched = scan_loading_maps(_test_maps(), upper_bounds=BOUNDS, batch_size=None)
    np.testing.assert_allclose(batched.lengthscales, scan.lengthscales, rtol=0.02)
    assert batched.suggestion == pytest.approx(scan.suggestion, rel=0.05)


def test_a_map_is_fitted_as_if_alone_whatever_its_batch():
    """A clean map batched with a noisy one neither stops nor steers the noisy map's fit."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    sines = np.sin(2 * np.pi * xx / 8) * np.sin(2 * np.pi * yy / 8)
    # A noise-free map (huge likelihood) next to a noisy one.
    maps = np.stack([sines, sines + 2.0 * rng.standard_normal(SHAPE)], axis=-1)
    separate = scan_loading_maps(maps, upper_bounds=BOUNDS)
    batched = scan_loading_maps(maps, upper_bounds=BOUNDS, batch_size=None)
    alone = scan_loading_maps(maps[..., 1:], upper_bounds=BOUNDS)
    np.testing.assert_allclose(separate.log_likelihood[:, 1], alone.log_likelihood[:, 0], rtol=1e-6)
    np.testing.assert_allclose(batched.log_likelihood[:, 1], alone.log_likelihood[:, 0], rtol=1e-6)


def test_plot_draws_one_curve_per_component_and_axis_and_shades_the_suggestion(scan):
    fig = scan.plot()
    try:
        ax = fig.axes[0]
        assert len(ax.lines) == 1 + 2 * 2  # diagonal + components × axes
        np.testing.assert_allclose(ax.lines[0].get_xdata(), ax.lines[0].get_ydata())
        assert len(ax.patches) == 1  # the shaded suggestion
        labels = ax.get_legend_handles_labels()[1]
        assert "component 4" in labels and "component 7" in labels
    finally:
        plt.close(fig)


# ------------------------------------------------------ basins and suggestion


def test_find_basins_needs_a_plateau_not_a_single_point():
    bounds = np.array([1.0, 2.0, 4.0, 8.0])
    curves = np.array(
        [
            [1.0, 1.0, 1.0],
            [2.0, 2.0, 2.0],
            [3.0, 4.0, 4.0],
            [3.2, 8.0, 5.0],  # 2: leaves the bound only at the last step → no plateau
        ]
    )
    basins = find_basins(bounds, curves)
    assert basins[0] == pytest.approx(3.1)
    assert np.isnan(basins[1]) and np.isnan(basins[2])


def test_suggest_bounds_brackets_the_finest_group_of_basins():
    assert suggest_bounds(np.array([np.nan, np.nan])) is None
    # Only the reliable basins count, unless none is reliable.
    basins, reliable = np.array([1.0, 3.0]), np.array([False, True])
    assert suggest_bounds(basins, reliable=reliable) == (2.0, 4.5)
    assert suggest_bounds(basins, reliable=~reliable) == (0.667, 1.5)
    assert suggest_bounds(np.array([1.0, np.nan]), reliable=reliable) == (0.667, 1.5)
    lo, hi = suggest_bounds(np.array([2.0, 2.5, 12.0]), margin=1.5)
    assert (lo, hi) == pytest.approx((2.0 / 1.5, 2.5 * 1.5), rel=1e-2)
    assert suggest_bounds(np.array([0.6]), margin=2.0, lower_limit=0.5)[0] == 0.5
    # Basins chained by steps < margin are one group (noisier maps sit lower).
    lo, hi = suggest_bounds(np.array([1.1, 1.5, 2.0, 20.0]), margin=1.5)
    assert (lo, hi) == pytest.approx((1.1 / 1.5, 2.0 * 1.5), rel=1e-2)


def test_a_curve_pinned_to_the_lower_bound_is_not_a_basin():
    bounds = np.array([1.0, 2.0, 4.0, 8.0])
    curves = np.array([[0.5, 1.0], [0.5, 1.8], [0.52, 1.8], [0.51, 1.8]])
    basins = find_basins(bounds, curves, lower_bound=0.5)
    assert np.isnan(basins[0]) and basins[1] == pytest.approx(1.8)
    assert find_basins(bounds, curves)[0] == pytest.approx(0.505)  # without the bound: a plateau


# ------------------------------------------------------------- on signals


def test_lengthscale_scan_of_a_signal_leaves_it_unchanged(unchanged):
    s = _signal_with_maps(_test_maps())
    with unchanged(s):
        result = lengthscale_scan(s, components=[0], upper_bounds=BOUNDS[:5])
    assert result.lengthscales.shape == (5, 1, 2)
    assert result.components == [0]


def test_the_gpu_running_out_of_memory_during_the_scan_says_what_to_do(monkeypatch, unchanged):
    import torch

    import hyperspy_gp.gp.training as training
    from hyperspy_gp.memory import MemoryBudgetError

    def fit_model(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB.")

    monkeypatch.setattr(training, "fit_model", fit_model)
    s = _signal_with_maps(_test_maps())
    with unchanged(s), pytest.raises(MemoryBudgetError, match=r"The GPU ran out of memory .*device='cpu'"):
        lengthscale_scan(s, components=[0], upper_bounds=BOUNDS[:2])


def test_auto_bounds_end_to_end_through_gp_reconstruct(tmp_path):
    s = _signal_with_maps(_test_maps())
    rec = gp_reconstruct(s, components=2, mode="independent", lengthscale_bounds="auto")
    settings = rec.signal.metadata.GP_reconstruction.settings
    assert settings.lengthscale_bounds_requested == "auto"
    lo, hi = settings.lengthscale_bounds
    assert lo <= ATOMIC_LENGTHSCALE <= hi
    assert list(settings.lengthscale_scan.suggestion) == [lo, hi]
    assert settings.lengthscale_scan.lengthscales_px.shape[1:] == (2, 2)
    ls = rec.hyperparameters["lengthscale_px"]
    assert ((ls >= lo - 1e-9) & (ls <= hi + 1e-9)).all()
    # The scan in the metadata survives a save/load round trip.
    rec.signal.save(tmp_path / "rec.hspy")
    loaded = hs.load(tmp_path / "rec.hspy")
    np.testing.assert_allclose(
        loaded.metadata.GP_reconstruction.settings.lengthscale_scan.basins_px,
        settings.lengthscale_scan.basins_px,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"upper_bounds": [4.0, 2.0]}, "strictly increasing"),
        ({"upper_bounds": []}, "non-empty"),
        ({"upper_bounds": [1.0, np.inf]}, "finite"),
        ({"upper_bounds": ["a"]}, "sequence of numbers"),
        ({"upper_bounds": [0.4, 2.0]}, "exceed the lower bound"),
        ({"lower_bound": -1.0}, "lower_bound"),
        ({"margin": 1.0}, "margin"),
        ({"batch_size": 0}, "batch_size"),
        ({"components": [5]}, "out of range"),
        ({"kernel": "rbf"}, "kernel"),
    ],
)
def test_bad_scan_requests_are_refused(kwargs, match):
    s = _signal_with_maps(_test_maps())
    with pytest.raises(ValueError, match=match):
        lengthscale_scan(s, **kwargs)


def test_a_signal_without_decomposition_is_refused():
    with pytest.raises(ValueError, match="decomposition"):
        lengthscale_scan(hs.signals.Signal1D(np.ones((6, 6, 8))))


def test_gp_reconstruct_refuses_an_unknown_bounds_keyword():
    s = _signal_with_maps(_test_maps())
    with pytest.raises(ValueError, match="'auto'"):
        gp_reconstruct(s, lengthscale_bounds="automatic")


def test_scan_with_missing_pixels_is_the_same_on_both_exact_paths():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    maps = np.stack([np.sin(xx / 2.0) * np.cos(yy / 3.0), np.cos(xx / 3.0)], -1) + 0.05 * rng.standard_normal((16, 16, 2))
    observed = np.ones((16, 16), dtype=bool)
    observed[3, 4] = observed[10, 12] = False
    maps[~observed] = np.nan
    scans = [scan_loading_maps(maps, upper_bounds=[1.0, 2.0, 4.0], observed=observed, masked_solver=solver)
             for solver in ("schur", "dense")]
    np.testing.assert_allclose(scans[0].lengthscales, scans[1].lengthscales, rtol=1e-8)
    np.testing.assert_allclose(scans[0].log_likelihood, scans[1].log_likelihood, rtol=1e-10)


def test_scan_of_a_signal_with_missing_edge_lines_fits_the_measured_box(unchanged):
    maps = _test_maps()
    masked = maps.copy()
    masked[:2], masked[:, -1] = np.nan, np.nan  # distorted first lines, a flyback column
    s = _signal_with_maps(np.nan_to_num(masked))
    s.learning_results.loadings = masked.reshape(-1, 2)
    with unchanged(s):
        result = lengthscale_scan(s, components=[0], upper_bounds=BOUNDS[:4])
    box = scan_loading_maps(maps[2:, :-1, :1], upper_bounds=BOUNDS[:4])
    np.testing.assert_allclose(result.lengthscales, box.lengthscales, rtol=1e-10)
    np.testing.assert_allclose(result.log_likelihood, box.log_likelihood, rtol=1e-10)
