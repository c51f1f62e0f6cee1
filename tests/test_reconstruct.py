"""gp_reconstruct end to end: API, outputs, real files, the input left untouched."""

import hyperspy.api as hs
import numpy as np
import pytest

from hyperspy_gp import GPReconstruction, gp_reconstruct
from hyperspy_gp.signals import EELSGPSpectrum, LazyEELSGPSpectrum
from hyperspy_gp.synthetic import (
    atomic_eels_spectrum_image,
    normalized_cross_correlation,
)
from tests.gp.devices import AVAILABLE_DEVICES


@pytest.fixture(scope="module")
def decomposed():
    """A small synthetic EELS spectrum image (EELS_GP) after SVD."""
    s = atomic_eels_spectrum_image(shape=(20, 18), n_channels=80, seed=1, signal_type="EELS_GP")
    s.decomposition(output_dimension=4, print_info=False)
    return s


@pytest.fixture(scope="module")
def reconstruction(decomposed):
    return gp_reconstruct(decomposed, components=3, upsampling=2)


def _with_decomposition(maps, factors, **signal_kwargs):
    """A Signal1D whose learning results are exactly ``maps`` (ny, nx, T) and ``factors``."""
    data = np.einsum("yxt,et->yxe", maps, factors)
    s = hs.signals.Signal1D(data, **signal_kwargs)
    s.learning_results.loadings = maps.reshape(-1, maps.shape[-1]).copy()
    s.learning_results.factors = factors.copy()
    s.learning_results.decomposition_algorithm = "SVD"
    return s


def _with_missing_pixels(maps, factors):
    """As :func:`_with_decomposition`, with the NaN of ``maps`` kept in the loadings (missing pixels)."""
    s = _with_decomposition(np.nan_to_num(maps), factors)
    s.learning_results.loadings = maps.reshape(-1, maps.shape[-1]).copy()
    return s


def _two_maps_missing_at_random(seed, fraction, y_period):
    """Two noisy 40 × 36 sine maps with ``fraction`` of the pixels missing at random, their truth and the mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:40, :36]
    truth = np.stack([np.sin(xx / 4.0) * np.cos(yy / 5.0), np.cos(xx / 6.0 + yy / y_period)], -1)
    maps = truth + 0.05 * rng.standard_normal(truth.shape)
    missing = rng.random((40, 36)) < fraction
    maps[missing] = np.nan
    return _with_missing_pixels(maps, np.abs(rng.standard_normal((16, 2))) + 0.1), truth, missing


# --------------------------------------------------------------------------- API


def test_returns_signals_of_the_input_class_with_upsampled_axes(decomposed, reconstruction, unchanged):
    rec = reconstruction
    assert isinstance(rec, GPReconstruction)
    assert isinstance(rec.signal, EELSGPSpectrum)
    nav_in = decomposed.axes_manager.navigation_axes
    nav_out = rec.signal.axes_manager.navigation_axes
    for a_in, a_out in zip(nav_in, nav_out):
        assert a_out.size == 2 * a_in.size
        assert a_out.scale == pytest.approx(a_in.scale / 2)
        assert a_out.offset == a_in.offset
        assert (a_out.name, a_out.units) == (a_in.name, a_in.units)
        # Original pixel centres keep their coordinates.
        np.testing.assert_allclose(a_out.axis[::2], a_in.axis)
    assert rec.signal.axes_manager.signal_axes[0].get_axis_dictionary() == (
        decomposed.axes_manager.signal_axes[0].get_axis_dictionary()
    )
    assert rec.signal.metadata.Acquisition_instrument.TEM.beam_energy == (
        decomposed.metadata.Acquisition_instrument.TEM.beam_energy
    )
    assert rec.loadings.data.shape == (3, 40, 36)
    assert rec.variance.data.shape == (3, 40, 36)
    assert (rec.variance.data > 0).all()


def test_spectrum_image_is_maps_times_factors(decomposed, reconstruction):
    rec = reconstruction
    factors = decomposed.learning_results.factors[:, :3]
    expected = np.einsum("tyx,et->yxe", rec.loadings.data, factors)
    np.testing.assert_allclose(rec.signal.data, expected, rtol=1e-10, atol=1e-12)


def test_learning_results_of_the_output_are_the_gp_maps(decomposed, reconstruction):
    out = reconstruction.signal
    loadings = out.get_decomposition_loadings()
    np.testing.assert_allclose(loadings.data, reconstruction.loadings.data)
    factors = out.get_decomposition_factors()
    np.testing.assert_array_equal(factors.data, decomposed.learning_results.factors[:, :3].T)


def test_hyperparameters_are_reported_in_metadata(decomposed, reconstruction):
    hp = reconstruction.hyperparameters
    md = reconstruction.signal.metadata.GP_reconstruction
    assert hp["lengthscale_px"].shape == (3, 2)
    scales = np.array([a.scale for a in decomposed.axes_manager.navigation_axes[::-1]])
    np.testing.assert_allclose(hp["lengthscale_calibrated"], hp["lengthscale_px"] * scales)
    assert hp["task_covariance"].shape == (3, 3)
    assert np.allclose(hp["task_covariance"], hp["task_covariance"].T)
    assert (hp["noise_variance"] > 0).all()
    assert hp["converged"] and hp["iterations"] > 0
    np.testing.assert_array_equal(md.hyperparameters.lengthscale_px, hp["lengthscale_px"])
    assert md.settings.mode == "parallel" and md.settings.upsampling == 2
    assert md.history.log_likelihood.shape[0] == hp["iterations"] + 1


@pytest.mark.parametrize("ext", ["hspy", "zspy"])
def test_results_survive_save_and_load(reconstruction, tmp_path, ext):
    path = tmp_path / f"rec.{ext}"
    reconstruction.signal.save(path)
    back = hs.load(path)
    assert isinstance(back, EELSGPSpectrum)
    np.testing.assert_allclose(back.data, reconstruction.signal.data)
    md = back.metadata.GP_reconstruction
    np.testing.assert_array_equal(md.hyperparameters.lengthscale_px, reconstruction.hyperparameters["lengthscale_px"])
    np.testing.assert_array_equal(md.history.lengthscale, reconstruction.history["lengthscale"])
    np.testing.assert_array_equal(md.loadings_variance, reconstruction.variance.data)
    np.testing.assert_allclose(back.learning_results.loadings, reconstruction.signal.learning_results.loadings)

    maps_path = tmp_path / f"maps.{ext}"
    reconstruction.loadings.save(maps_path)
    maps = hs.load(maps_path)
    np.testing.assert_array_equal(maps.metadata.Signal.Noise_properties.variance.data, reconstruction.variance.data)


def test_method_on_our_class_is_the_function(decomposed, reconstruction, unchanged):
    with unchanged(decomposed):
        rec = decomposed.gp_reconstruct(components=3, upsampling=2)
    np.testing.assert_allclose(rec.loadings.data, reconstruction.loadings.data)


def test_components_as_list_and_independent_mode(decomposed, unchanged):
    with unchanged(decomposed):
        rec = gp_reconstruct(decomposed, components=[0, 2], mode="independent")
    assert rec.loadings.data.shape == (2, 20, 18)
    assert rec.signal.metadata.GP_reconstruction.settings.components == [0, 2]
    # Independent GPs: one length scale pair per map, diagonal B.
    hp = rec.hyperparameters
    assert not np.allclose(hp["lengthscale_px"][0], hp["lengthscale_px"][1])
    assert np.count_nonzero(hp["task_covariance"] - np.diag(np.diag(hp["task_covariance"]))) == 0


def test_chunked_prediction_equals_single_chunk(decomposed, reconstruction):
    rec = gp_reconstruct(decomposed, components=3, upsampling=2, chunks=7)
    # Equal to rounding: products of other shapes may sum in another order, so values
    # that cancel to far below the map's scale differ in their last digits.
    for got, expected in ((rec.loadings.data, reconstruction.loadings.data),
                          (rec.variance.data, reconstruction.variance.data)):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13 * np.abs(expected).max())


def test_lazy_output_equals_eager(decomposed, reconstruction):
    lazy = gp_reconstruct(decomposed, components=3, upsampling=2, lazy_output=True)
    assert isinstance(lazy.signal, LazyEELSGPSpectrum)
    np.testing.assert_allclose(lazy.signal.data.compute(), reconstruction.signal.data)


def test_lazy_input_with_dask_learning_results(unchanged):
    s = atomic_eels_spectrum_image(shape=(16, 16), n_channels=64, seed=2, lazy=True)
    s.decomposition(output_dimension=3, print_info=False)
    with unchanged(s):
        rec = gp_reconstruct(s, components=2)
    assert rec.signal._lazy
    assert rec.signal.data.shape == (16, 16, 64)


def test_centred_decomposition_adds_the_mean_back():
    s = atomic_eels_spectrum_image(shape=(14, 14), n_channels=50, seed=4)
    s.decomposition(output_dimension=3, centre="navigation", print_info=False)
    rec = gp_reconstruct(s, components=3)
    mean = s.learning_results.mean.reshape(-1)
    expected = np.einsum("tyx,et->yxe", rec.loadings.data, s.learning_results.factors[:, :3]) + mean
    np.testing.assert_allclose(rec.signal.data, expected, rtol=1e-10)
    # and the reconstruction is close to the data it denoises
    assert normalized_cross_correlation(rec.signal.data, s.data) > 0.9


def test_lengthscale_bounds_are_respected_in_both_modes(decomposed):
    for mode in ("parallel", "independent"):
        rec = gp_reconstruct(decomposed, components=2, mode=mode, lengthscale_bounds=(1.0, 1.8))
        ls = rec.hyperparameters["lengthscale_px"]
        assert (ls >= 1.0).all() and (ls <= 1.8).all(), mode


def test_mean_at_original_pixels_equals_prediction_at_training_inputs(decomposed):
    rec1 = gp_reconstruct(decomposed, components=2, upsampling=1)
    rec3 = gp_reconstruct(decomposed, components=2, upsampling=3)
    np.testing.assert_array_equal(rec1.hyperparameters["lengthscale_px"], rec3.hyperparameters["lengthscale_px"])
    np.testing.assert_allclose(rec3.loadings.data[:, ::3, ::3], rec1.loadings.data, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rec3.variance.data[:, ::3, ::3], rec1.variance.data, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("device", AVAILABLE_DEVICES)
def test_parallel_gp_reconstructs_a_noisy_map_better_than_independent(device):
    """A clean map lends its spatial structure to a very noisy one with the same structure."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :24]
    truth = 0.5 + 0.5 * np.sin(2 * np.pi * xx / 6) * np.sin(2 * np.pi * yy / 6)
    maps = np.stack([truth + 0.02 * rng.standard_normal(truth.shape),
                     truth + 0.8 * rng.standard_normal(truth.shape)], -1)
    factors = np.abs(rng.standard_normal((30, 2))) + 0.1
    s = _with_decomposition(maps, factors)
    scores = {}
    for mode in ("parallel", "independent"):
        rec = gp_reconstruct(s, components=2, mode=mode, device=device)
        assert isinstance(rec.loadings.data, np.ndarray)
        scores[mode] = normalized_cross_correlation(rec.loadings.data[1], truth)
    noisy_score = normalized_cross_correlation(maps[..., 1], truth)
    assert scores["parallel"] > scores["independent"] + 0.05
    assert scores["parallel"] > noisy_score + 0.2


# --------------------------------------------------------------- real files


def test_eels_dm4_loads_into_our_class_and_reconstructs(data_file, unchanged):
    s = hs.load(data_file("EELS_SI.dm4"), signal_type="EELS_GP")
    assert isinstance(s, EELSGPSpectrum)
    s.decomposition(output_dimension=2, print_info=False)
    with unchanged(s):
        rec = s.gp_reconstruct(components=2, upsampling=2)
    assert isinstance(rec.signal, EELSGPSpectrum)
    assert rec.signal.axes_manager.navigation_shape == (4, 4)
    assert [a.units for a in rec.signal.axes_manager.navigation_axes] == ["µm", "µm"]
    assert rec.signal.axes_manager.signal_axes[0].offset == s.axes_manager.signal_axes[0].offset
    assert rec.signal.metadata.Acquisition_instrument.TEM.beam_energy == s.metadata.Acquisition_instrument.TEM.beam_energy
    assert np.isfinite(rec.signal.data).all()


def test_cl_spectrum_image_reconstructs(data_file, unchanged):
    s = hs.load(data_file("test-MonarcCL_spectrum-SI.dm4"))
    s.decomposition(output_dimension=2, print_info=False)
    with unchanged(s):
        rec = gp_reconstruct(s, components=2, upsampling=2)
    assert type(rec.signal) is type(s)
    assert rec.signal.metadata.Signal.signal_type == s.metadata.Signal.signal_type
    assert rec.signal.axes_manager.navigation_shape == (6, 6)


def test_line_scan_uses_a_1d_gp(data_file, unchanged):
    s = hs.load(data_file("test-MonoCL_spectrum-SI.dm4"))
    s.decomposition(output_dimension=3, print_info=False)
    with unchanged(s):
        rec = gp_reconstruct(s, components=3, upsampling=2)
    assert rec.signal.axes_manager.navigation_shape == (134,)
    assert rec.loadings.data.shape == (3, 134)
    assert rec.hyperparameters["lengthscale_px"].shape == (3, 1)


def test_single_spectrum_raises_a_clear_error(data_file):
    s = hs.load(data_file("test-EELS_spectrum.dm3"))
    with pytest.raises(ValueError, match="single spectrum"):
        gp_reconstruct(s, components=1)


def test_complex_data_raises_a_clear_error(data_file):
    s = hs.load(data_file("complex_image_stack.dm3"))
    with pytest.raises(ValueError, match="complex|Signal1D"):
        gp_reconstruct(s, components=1)


def test_integer_data_works_without_conversion(unchanged):
    s = atomic_eels_spectrum_image(shape=(12, 12), n_channels=40, seed=3)
    counts = s.deepcopy()
    counts.change_dtype("int32")
    # HyperSpy's decomposition refuses integers and says how to convert:
    with pytest.raises(TypeError, match="change_dtype"):
        counts.deepcopy().decomposition(print_info=False)
    # gp_reconstruct on integer data with decomposition results needs no conversion.
    s.decomposition(output_dimension=2, print_info=False)
    counts.learning_results = s.learning_results
    with unchanged(counts):
        rec = gp_reconstruct(counts, components=2)
    assert np.issubdtype(rec.signal.data.dtype, np.floating)
    assert counts.data.dtype == np.int32


# -------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"components": 0}, "out of range"),
        ({"components": 99}, "out of range"),
        ({"components": [0, 0]}, "duplicated"),
        ({"components": []}, "empty"),
        ({"components": [0, 7]}, "out of range"),
        ({"components": 2, "mode": "joint"}, "mode"),
        ({"components": 2, "upsampling": 0}, "upsampling"),
        ({"components": 2, "upsampling": 1.5}, "upsampling"),
        ({"components": 2, "lengthscale_bounds": (3, 2)}, "lower bound must be smaller"),
        ({"components": 2, "lengthscale_bounds": (-1, 2)}, "positive"),
        ({"components": 2, "lengthscale_bounds": 5}, "pair"),
        ({"components": 2, "kernel": "rbf"}, "kernel"),
        ({"components": 2, "device": "tpu"}, "device"),
        ({"components": 2, "chunks": 0}, "chunks"),
        ({"components": 2, "solver": "cg"}, "solver"),
        ({"components": 2, "variance_samples": 1}, "variance_samples"),
        ({"components": 2, "variance_samples": 16.0}, "variance_samples"),
        ({"components": 2, "variance_samples": True}, "variance_samples"),
    ],
)
def test_bad_requests_raise_before_fitting(decomposed, unchanged, kwargs, match):
    with unchanged(decomposed), pytest.raises(ValueError, match=match):
        gp_reconstruct(decomposed, **kwargs)


def test_without_decomposition_says_to_decompose(unchanged):
    s = atomic_eels_spectrum_image(shape=(8, 8), n_channels=30, seed=0)
    with unchanged(s), pytest.raises(ValueError, match=r"s\.decomposition\(\)"):
        gp_reconstruct(s, components=1)


def test_cuda_without_gpu_is_a_clear_error(decomposed, monkeypatch):
    import torch

    # Hide a GPU where there is one, so that the refusal is tested on every machine.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no GPU"):
        gp_reconstruct(decomposed, components=2, device="cuda")


def test_navigation_mask_pixels_are_predicted_by_either_exact_path(unchanged):
    s = atomic_eels_spectrum_image(shape=(12, 12), n_channels=40, seed=0)
    mask = np.zeros(s.axes_manager.navigation_shape, dtype=bool)  # (x, y) order
    mask[4, 3] = True
    s.decomposition(output_dimension=2, navigation_mask=mask, print_info=False)
    with unchanged(s):
        rec = gp_reconstruct(s, components=2, upsampling=2, tol=1e-12)
    settings = rec.signal.metadata.GP_reconstruction.settings
    assert settings.solver == "kronecker" and settings.missing_pixels == 1  # Schur complement
    assert np.isfinite(rec.signal.data).all()
    assert np.isfinite(rec.loadings.data[:, 6, 8]).all()  # the masked pixel (y=3, x=4)
    dense = gp_reconstruct(s, components=2, upsampling=2, tol=1e-12, solver="dense")
    assert dense.signal.metadata.GP_reconstruction.settings.solver == "dense"
    span = np.ptp(dense.loadings.data)
    np.testing.assert_allclose(rec.loadings.data, dense.loadings.data, rtol=0, atol=1e-5 * span)
    np.testing.assert_allclose(rec.variance.data, dense.variance.data, rtol=1e-3)


def test_a_few_masked_pixels_on_a_scan_too_large_for_the_dense_path():
    s = atomic_eels_spectrum_image(shape=(64, 64), n_channels=24, seed=0)
    mask = np.zeros(s.axes_manager.navigation_shape, dtype=bool)
    mask[[5, 30, 50], [7, 31, 12]] = True
    s.decomposition(output_dimension=3, navigation_mask=mask, print_info=False)
    rec = gp_reconstruct(s, components=3)  # 4093 pixels × 3 maps: over the dense limit
    settings = rec.signal.metadata.GP_reconstruction.settings
    assert settings.solver == "kronecker" and settings.missing_pixels == 3
    assert np.isfinite(rec.loadings.data).all() and np.isfinite(rec.variance.data).all()
    with pytest.raises(ValueError, match="at most 6000 observed values"):
        gp_reconstruct(s, components=3, solver="dense")


def test_a_random_sparse_scan_is_fitted_by_the_schur_complement_with_cg(unchanged, monkeypatch):
    # Half the pixels at random: too many measured values for the dense path, too many
    # missing ones to factorise the Schur complement; CG solves it.
    from hyperspy_gp import memory

    monkeypatch.setattr(memory, "MAX_STREAMED_INCREASE_COST", 0.0)  # the Monte-Carlo variance (streamed below)
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:80, :72]
    truth = np.stack([np.sin(xx / 4.0) * np.cos(yy / 5.0), np.cos(xx / 6.0 + yy / 9.0), np.sin(yy / 7.0)], -1)
    maps = truth + 0.05 * rng.standard_normal(truth.shape)
    missing = rng.random((80, 72)) < 0.5
    maps[missing] = np.nan
    s = _with_missing_pixels(maps, np.abs(rng.standard_normal((16, 3))) + 0.1)
    with unchanged(s):
        rec = gp_reconstruct(s, components=3)
    settings = rec.signal.metadata.GP_reconstruction.settings
    assert settings.solver == "kronecker" and settings.missing_pixels == int(missing.sum())
    assert settings.masked_solver == "schur-cg"
    loadings = np.moveaxis(rec.loadings.data, 0, -1)
    assert np.abs(loadings[missing] - truth[missing]).max() < 0.15  # the unmeasured pixels, predicted
    # The variance is a Monte-Carlo estimate there, reported with its standard error.
    hyper = rec.hyperparameters
    assert hyper["variance_samples"] > 0 and hyper["variance_standard_error"].shape == (80, 72, 3)
    variance = np.moveaxis(rec.variance.data, 0, -1)
    assert (variance[missing].mean(0) > variance[~missing].mean(0)).all()
    assert np.median(hyper["variance_standard_error"][missing] / variance[missing]) < 0.2


def test_after_a_fit_by_cg_the_variance_is_streamed_exactly_where_affordable(unchanged, monkeypatch):
    # Half of a 40 × 36 scan at random, the Schur complement by CG; its columns taken as
    # too large, the exact variance increase is streamed on the upsampled grid.
    from hyperspy_gp import memory

    monkeypatch.setattr(memory, "MAX_SCHUR_ENTRIES", 0)
    s, _, missing = _two_maps_missing_at_random(seed=4, fraction=0.5, y_period=9.0)
    with unchanged(s):
        rec = gp_reconstruct(s, components=2, upsampling=2, solver="kronecker")
    assert rec.signal.metadata.GP_reconstruction.settings.masked_solver == "schur-cg"
    assert "variance_standard_error" not in rec.hyperparameters  # exact, not a Monte-Carlo estimate
    variance = np.moveaxis(rec.variance.data, 0, -1)[::2, ::2]  # at the scan's pixels
    assert np.isfinite(variance).all()
    assert (variance[missing].mean(0) > variance[~missing].mean(0)).all()


def test_beyond_the_streamed_limits_the_exact_variance_is_computed_window_by_window(unchanged, monkeypatch, caplog):
    # Half of a 72 × 64 scan at random, maps with short length scales: no factorised
    # columns, no streamed increase (as if the scan were large); the windows serve.
    from hyperspy_gp import memory

    monkeypatch.setattr(memory, "MAX_SCHUR_ENTRIES", 0)
    monkeypatch.setattr(memory, "MAX_STREAMED_MISSING_SQUARED", 0)
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(8)
    truth = np.stack([gaussian_filter(rng.standard_normal((72, 64)), 1.2) for _ in range(2)], -1)
    truth /= truth.std()
    maps = truth + 0.05 * rng.standard_normal(truth.shape)
    missing = rng.random((72, 64)) < 0.5
    maps[missing] = np.nan
    s = _with_missing_pixels(maps, np.abs(rng.standard_normal((16, 2))) + 0.1)
    with unchanged(s), caplog.at_level("INFO", logger="hyperspy_gp.gp.schur_iterative_prediction"):
        rec = gp_reconstruct(s, components=2, upsampling=2, solver="kronecker")
    assert rec.signal.metadata.GP_reconstruction.settings.masked_solver == "schur-cg"
    assert rec.hyperparameters["lengthscale_px"].max() < 2.5  # margins of 15 px at most: local windows
    assert "windows of 6 length scales" in caplog.text
    assert "variance_standard_error" not in rec.hyperparameters  # exact, not a Monte-Carlo estimate
    variance = np.moveaxis(rec.variance.data, 0, -1)[::2, ::2]
    assert np.isfinite(variance).all()
    assert (variance[missing].mean(0) > variance[~missing].mean(0)).all()


def test_a_large_masked_region_is_fitted_with_the_coarse_space(unchanged):
    # A masked corner (a navigation mask over vacuum), 1134 of 4096 pixels: too many to
    # factorise the Schur complement; CG with the coarse-space correction solves it.
    from hyperspy_gp.gp.coarse_space import coarse_points

    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[:64, :64]
    truth = np.stack([np.sin(xx / 4.0) * np.cos(yy / 5.0), np.cos(xx / 6.0 + yy / 9.0), np.sin(yy / 7.0)], -1)
    maps = truth + 0.1 * rng.standard_normal(truth.shape)
    missing = (yy - 63) ** 2 + (xx - 63) ** 2 < 38**2
    maps[missing] = np.nan
    s = _with_missing_pixels(maps, np.abs(rng.standard_normal((16, 3))) + 0.1)
    with unchanged(s):
        rec = gp_reconstruct(s, components=3, upsampling=1)
    settings = rec.signal.metadata.GP_reconstruction.settings
    assert settings.masked_solver == "schur-cg" and settings.missing_pixels == int(missing.sum())
    assert coarse_points(~missing, 1, 3).sum() > 100  # the coarse space is in use
    # Fitted by CG, predicted by the factorised posterior (its columns fit): exact variance.
    assert "variance_standard_error" not in rec.hyperparameters
    loadings, variance = np.moveaxis(rec.loadings.data, 0, -1), np.moveaxis(rec.variance.data, 0, -1)
    assert np.isfinite(loadings).all() and np.isfinite(variance).all()
    assert np.abs(loadings[~missing] - truth[~missing]).max() < 0.3  # denoised where measured
    # Far inside the region the prediction falls back to the prior: variance grows inwards.
    edge = missing & ((yy - 63) ** 2 + (xx - 63) ** 2 > 34**2)
    deep = (yy - 63) ** 2 + (xx - 63) ** 2 < 20**2
    assert (variance[deep].mean(0) > variance[edge].mean(0)).all()


def test_missing_pixels_take_the_cheapest_path_preferring_exact_ones():
    from hyperspy_gp.request import Request, choose_solver

    maps = np.random.default_rng(0).normal(size=(90, 80, 2))
    missing = np.random.default_rng(1).random((90, 80)) < 0.4

    def choose(n_missing, mode):
        holes = maps.copy()
        holes[np.nonzero(missing)[0][:n_missing], np.nonzero(missing)[1][:n_missing]] = np.nan
        request = Request([0, 1], mode, 1, None, "separable", 1, "auto", "cpu", "float64", None)
        choose_solver(holes, request)
        return request.masked_solver

    assert choose(3, "parallel") == "schur"  # a few dead pixels: factorised, exact
    assert choose(100, "independent") == "schur"
    assert choose(int(missing.sum()), "independent") == "schur-cg"  # factorising would cost ~20× more
    assert choose(int(missing.sum()), "parallel") == "schur-cg"  # no exact path fits at all


@pytest.mark.parametrize(("start", "max_cg", "where"), [("default", 100, "after"), ("warm", 40, "at the start")])
def test_auto_refits_exactly_when_the_schur_complement_by_cg_fails(monkeypatch, unchanged, start, max_cg, where):
    """CG stops converging: solver="auto" refits with the factorised exact path it had ruled slower.

    From the default start CG fails mid-fit (33 iterations at the start, ~600 at low
    noise); from the warm start, the complete rectangle's optimum, at its first point.
    """
    import warnings

    from hyperspy_gp import request as request_module
    from hyperspy_gp.gp import schur_iterative, warm_start

    yy, xx = np.mgrid[:32, :32]
    maps = np.stack([np.sin(xx / 2.5) * np.cos(yy / 3.0), np.cos(yy / 4.0) + 0.3 * np.sin(xx / 3.0)], -1)
    maps = maps + 0.01 * np.random.default_rng(0).standard_normal(maps.shape)
    maps[(yy - 31) ** 2 + (xx - 31) ** 2 <= 19**2] = np.nan  # a masked corner
    s = _with_missing_pixels(maps, np.abs(np.random.default_rng(1).standard_normal((20, 2))) + 0.1)
    exact = gp_reconstruct(s, components=2)  # small enough for an exact factorised path
    exact_solver = exact.signal.metadata.GP_reconstruction.settings.masked_solver
    assert exact.hyperparameters["converged"] and exact_solver in ("schur", "dense")

    monkeypatch.setattr(request_module, "EXACT_PREFERENCE", 0.0)  # take CG where an exact path fits
    monkeypatch.setattr(schur_iterative, "MAX_CG_ITERATIONS", max_cg)
    if start == "default":
        monkeypatch.setattr(warm_start, "MIN_FRACTION", 2.0)  # no rectangle qualifies
    with unchanged(s), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = gp_reconstruct(s, components=2)
    messages = [str(w.message) for w in caught]
    assert any(f"converging {where}" in m and "refitting with the exact factorised path" in m for m in messages), \
        messages
    assert ("warm_start_region" in rec.hyperparameters) is (start == "warm")
    assert not any("GP training stopped" in m for m in messages)  # the CG fit's warning is replaced
    assert rec.hyperparameters["converged"]
    assert rec.signal.metadata.GP_reconstruction.settings.masked_solver == exact_solver
    for name in ("lengthscale_px", "noise_variance"):
        np.testing.assert_allclose(rec.hyperparameters[name], exact.hyperparameters[name], rtol=1e-3, err_msg=name)
    scale = np.abs(exact.loadings.data).max()  # the two fits' optima agree to about 1e-3
    np.testing.assert_allclose(rec.loadings.data, exact.loadings.data, rtol=0, atol=1e-3 * scale)


def test_a_masked_corner_starts_the_fit_from_its_largest_complete_rectangle(tmp_path, unchanged):
    """Reported in scan pixels (a skipped column shifts the fitted lines), and saved with the result."""
    yy, xx = np.mgrid[:32, :30]
    maps = np.stack([np.sin(xx / 2.5) * np.cos(yy / 3.0), np.cos(yy / 4.0) + 0.3 * np.sin(xx / 3.0)], -1)
    maps = maps + 0.01 * np.random.default_rng(0).standard_normal(maps.shape)
    maps[(yy - 31) ** 2 + (xx - 29) ** 2 <= 18**2] = np.nan  # a masked corner
    maps[:, 0] = np.nan  # a flyback column: left out of the fitted lines
    s = _with_missing_pixels(maps, np.abs(np.random.default_rng(1).standard_normal((20, 2))) + 0.1)
    with unchanged(s):
        rec = gp_reconstruct(s, components=2)
    hp = rec.hyperparameters
    (r0, r1), (c0, c1) = hp["warm_start_region"]
    assert np.isfinite(maps[r0:r1, c0:c1]).all() and c0 == 1  # complete, in scan columns
    assert (r1 - r0) * (c1 - c0) >= 0.25 * np.isfinite(maps[..., 0]).sum()
    assert hp["warm_start_iterations"] > 0 and hp["converged"]
    rec.signal.save(tmp_path / "rec.hspy")
    back = hs.load(tmp_path / "rec.hspy").metadata.GP_reconstruction.hyperparameters
    np.testing.assert_array_equal(back.warm_start_region, hp["warm_start_region"])
    assert back.warm_start_iterations == hp["warm_start_iterations"]


def test_scattered_missing_pixels_start_from_the_filled_in_scan(tmp_path, unchanged):
    """No complete rectangle: the fit starts from the whole scan's, its missing pixels filled in; reported, saved."""
    s, truth, missing = _two_maps_missing_at_random(0, 0.1, 5.0)
    with unchanged(s):
        rec = gp_reconstruct(s, components=2)
    hp = rec.hyperparameters
    assert rec.signal.metadata.GP_reconstruction.settings.missing_pixels == missing.sum()
    assert hp["warm_start_imputed_pixels"] == missing.sum() and hp["converged"]
    np.testing.assert_array_equal(hp["warm_start_region"], [[0, 40], [0, 36]])
    rec.signal.save(tmp_path / "rec.hspy")
    back = hs.load(tmp_path / "rec.hspy").metadata.GP_reconstruction.hyperparameters
    assert back.warm_start_imputed_pixels == missing.sum()


def test_cg_failing_at_the_warm_start_without_an_exact_path_fits_from_the_default_start(monkeypatch, unchanged):
    """The warm start's low noise defeats CG and nothing exact fits: the fit runs from the default start instead."""
    import warnings

    from hyperspy_gp import memory
    from hyperspy_gp.gp import dense, schur_iterative
    from hyperspy_gp.gp.training import ConvergenceWarning

    yy, xx = np.mgrid[:32, :32]
    maps = np.stack([np.sin(xx / 2.5) * np.cos(yy / 3.0), np.cos(yy / 4.0) + 0.3 * np.sin(xx / 3.0)], -1)
    maps = maps + 0.01 * np.random.default_rng(0).standard_normal(maps.shape)
    maps[(yy - 31) ** 2 + (xx - 31) ** 2 <= 19**2] = np.nan  # a masked corner
    s = _with_missing_pixels(maps, np.abs(np.random.default_rng(1).standard_normal((20, 2))) + 0.1)
    monkeypatch.setattr(dense, "MAX_DENSE_VALUES", 10)  # neither exact path fits: CG with no fallback
    monkeypatch.setattr(memory, "MAX_SCHUR_ENTRIES", 10)
    monkeypatch.setattr(schur_iterative, "MAX_CG_ITERATIONS", 40)  # 33 at the default start, more at the warm one
    with unchanged(s), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = gp_reconstruct(s, components=2)
    assert rec.signal.metadata.GP_reconstruction.settings.masked_solver == "schur-cg"
    assert "warm_start_region" not in rec.hyperparameters
    assert rec.history["lengthscale"][0, 0, 0] == pytest.approx(3.0)  # the default start
    stopped = [w for w in caught
               if issubclass(w.category, ConvergenceWarning) and "GP training stopped" in str(w.message)]
    assert stopped and not rec.hyperparameters["converged"]  # CG failed again at a lower noise, best iterate kept
    assert np.isfinite(rec.signal.data).all()


def test_no_exact_refit_where_it_would_not_fit_the_memory_budget(monkeypatch):
    from hyperspy_gp import request as request_module
    from hyperspy_gp.gp import schur_iterative
    from hyperspy_gp.gp.coarse_space import coarse_points
    from hyperspy_gp.gp.training import ConvergenceWarning
    from hyperspy_gp.memory import estimate_memory

    yy, xx = np.mgrid[:96, :96]
    maps = np.stack([np.sin(xx / 2.5) * np.cos(yy / 3.0), np.cos(yy / 4.0) + 0.3 * np.sin(xx / 3.0)], -1)
    maps = maps + 0.01 * np.random.default_rng(0).standard_normal(maps.shape)
    masked = (yy - 95) ** 2 + (xx - 95) ** 2 <= 30**2  # 736 pixels
    maps[masked] = np.nan
    s = _with_missing_pixels(maps, np.abs(np.random.default_rng(1).standard_normal((20, 2))) + 0.1)
    kwargs = dict(mode="parallel", n_missing=int(masked.sum()), lazy_output=False)
    n_coarse = [int(coarse_points(~masked, 1, maps).sum()) for maps in (1, 2)]  # a lattice per coarse map count
    # CG with the Monte-Carlo posterior: the exact factorised one would not fit either.
    cg = estimate_memory((96, 96), 2, 20, schur_cg=True, n_coarse=n_coarse, exact_posterior=False, **kwargs).total
    factorised = estimate_memory((96, 96), 2, 20, **kwargs).total  # the cheaper exact path here
    assert factorised > 2 * cg
    monkeypatch.setattr(request_module, "EXACT_PREFERENCE", 0.0)  # take CG where an exact path fits
    monkeypatch.setattr(schur_iterative, "MAX_CG_ITERATIONS", 100)
    with pytest.warns(ConvergenceWarning, match="GP training stopped"):
        rec = gp_reconstruct(s, components=2, memory_budget=1.5 * cg)
    assert not rec.hyperparameters["converged"]
    assert rec.signal.metadata.GP_reconstruction.settings.masked_solver == "schur-cg"


def test_a_memory_budget_between_the_two_posteriors_keeps_the_monte_carlo_one():
    # After a fit by CG the exact factorised posterior is taken where its columns fit, and
    # the Monte-Carlo one where only that fits the memory budget.
    from types import SimpleNamespace

    from hyperspy_gp.memory import MemoryBudgetError
    from hyperspy_gp.reconstruct import _check_memory, _estimate_memory
    from hyperspy_gp.request import Request, choose_solver

    yy, xx = np.mgrid[:64, :64]
    maps = np.random.default_rng(6).standard_normal((64, 64, 3))
    maps[(yy - 63) ** 2 + (xx - 63) ** 2 < 38**2] = np.nan  # a masked corner: CG, columns that fit
    request = Request([0, 1, 2], "parallel", 1, None, "separable", 1, "auto", "cpu", "float64", None)
    request.observed = choose_solver(maps, request)
    assert request.masked_solver == "schur-cg"
    decomposition = SimpleNamespace(factors=np.zeros((16, 3)))
    exact = _estimate_memory(maps, decomposition, request, False, "schur-cg").total
    request.exact_posterior = False
    monte_carlo = _estimate_memory(maps, decomposition, request, False, "schur-cg").total
    assert exact > monte_carlo
    for budget, expected in ((exact + 1, True), ((exact + monte_carlo) // 2, False)):
        request.exact_posterior = True
        _check_memory(maps, decomposition, request, False, budget)
        assert request.exact_posterior is expected
    request.exact_posterior = True
    with pytest.raises(MemoryBudgetError):
        _check_memory(maps, decomposition, request, False, monte_carlo // 2)
    assert request.exact_posterior  # neither fits: the error reports the exact posterior's estimate


def test_a_scan_of_every_other_line_is_fitted_exactly_on_its_lines(unchanged):
    # A sparse line scan: 40 of 80 lines, 3200 missing pixels, beyond the dense and the
    # Schur paths on the full grid; on the grid of its lines it is complete (Kronecker).
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:80, :64]
    maps = np.stack([np.sin(xx / 4.0) * np.cos(yy / 5.0), np.cos(xx / 6.0 + yy / 9.0)], -1)
    maps += 0.05 * rng.standard_normal(maps.shape)
    maps[1::2] = np.nan
    factors = np.abs(rng.standard_normal((16, 2))) + 0.1
    s = _with_missing_pixels(maps, factors)
    with unchanged(s):
        rec = gp_reconstruct(s, components=2, upsampling=2)
    settings = rec.signal.metadata.GP_reconstruction.settings
    assert settings.solver == "kronecker" and settings.missing_pixels == 40 * 64
    assert settings.skipped_lines == [list(range(1, 80, 2)), []]
    truth = np.stack([np.sin(xx / 4.0) * np.cos(yy / 5.0), np.cos(xx / 6.0 + yy / 9.0)], 0)
    skipped = rec.loadings.data[:, 2::4, ::2]  # the unmeasured lines, at the scan pixels
    assert np.abs(skipped - truth[:, 1::2]).max() < 0.1  # interpolated across one line
    var = rec.variance.data
    assert (var[:, 2::4, ::2].mean((1, 2)) > var[:, 4:-4:4, ::2].mean((1, 2))).all()  # unmeasured: less sure
    # The iterative path needs evenly spaced lines: the empty ones between measured ones
    # join its fit as missing pixels, the last (an edge) stays out.
    from hyperspy_gp.request import Request, choose_solver

    forced = Request([0, 1], "parallel", 1, None, "matern", 1, "iterative", "cpu", "float64", None)
    observed = choose_solver(maps, forced)
    assert forced.solver == "iterative" and forced.skipped_lines((80, 64)) == [[79], []]
    assert observed.shape == (79, 64) and (~observed[1::2]).all() and observed[::2].all()


def test_missing_edge_lines_are_left_out_exactly_and_predicted(tmp_path, unchanged):
    # Distorted first lines and a flyback column: 1168 missing pixels, too many for the
    # Schur complement and too many measured ones for the dense path on the full scan.
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:100, :90]
    maps = np.stack([np.sin(xx / 3.0) * np.cos(yy / 4.0), np.cos(xx / 5.0 + yy / 7.0)], -1)
    maps += 0.05 * rng.standard_normal(maps.shape)
    maps[:12], maps[:, -1] = np.nan, np.nan
    factors = np.abs(rng.standard_normal((16, 2))) + 0.1
    s = _with_missing_pixels(maps, factors)
    with unchanged(s):
        rec = gp_reconstruct(s, components=2, upsampling=2)
    settings = rec.signal.metadata.GP_reconstruction.settings
    assert settings.solver == "kronecker" and settings.missing_pixels == 12 * 90 + 88
    assert settings.skipped_lines == [list(range(12)), [89]]
    assert rec.loadings.data.shape == (2, 200, 180)
    assert np.isfinite(rec.signal.data).all() and np.isfinite(rec.variance.data).all()
    # Inside the box: the reconstruction of the cropped maps themselves.
    box = maps[12:, :89]
    cropped = gp_reconstruct(_with_decomposition(box, factors), components=2, upsampling=2)
    np.testing.assert_allclose(rec.hyperparameters["lengthscale_px"], cropped.hyperparameters["lengthscale_px"])
    np.testing.assert_allclose(rec.loadings.data[:, 24:, :178], cropped.loadings.data, rtol=0, atol=1e-9)
    np.testing.assert_allclose(rec.variance.data[:, 24:, :178], cropped.variance.data, rtol=1e-9)
    # Outside it, extrapolated, with more uncertainty the farther from the data.
    assert (rec.variance.data[:, 0].mean(-1) > 5 * rec.variance.data[:, 100].mean(-1)).all()
    rec.loadings.save(tmp_path / "loadings.hspy")
    loaded = hs.load(tmp_path / "loadings.hspy")
    assert loaded.metadata.GP_reconstruction.settings.skipped_lines == [list(range(12)), [89]]


def test_missing_pixel_is_filled_from_its_neighbours_with_more_uncertainty():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:16, :16]
    truth = 0.5 + 0.5 * np.sin(2 * np.pi * xx / 8) * np.sin(2 * np.pi * yy / 8)
    maps = np.stack([truth, truth[::-1]], -1) + 0.02 * rng.standard_normal((16, 16, 2))
    maps[5, 9] = np.nan
    s = _with_missing_pixels(maps, np.abs(rng.standard_normal((20, 2))) + 0.1)
    rec = gp_reconstruct(s, components=2)
    filled = rec.loadings.data[:, 5, 9]
    np.testing.assert_allclose(filled, [truth[5, 9], truth[::-1][5, 9]], atol=0.05)
    var = rec.variance.data
    neighbours = np.stack([var[:, 4, 9], var[:, 6, 9], var[:, 5, 8], var[:, 5, 10]], axis=-1)
    assert (var[:, 5, 9] > 2 * neighbours.max(axis=-1)).all()


def test_forcing_the_dense_solver_gives_the_kronecker_result(decomposed):
    # A tight optimiser tolerance, so both fits reach the same optimum, not just nearby.
    kron = gp_reconstruct(decomposed, components=3, upsampling=2, tol=1e-12)
    dense = gp_reconstruct(decomposed, components=3, upsampling=2, solver="dense", tol=1e-12)
    np.testing.assert_allclose(dense.hyperparameters["lengthscale_px"], kron.hyperparameters["lengthscale_px"], rtol=1e-5)
    scale = np.abs(kron.loadings.data).max()
    np.testing.assert_allclose(dense.loadings.data, kron.loadings.data, rtol=0, atol=1e-5 * scale)


def test_variance_samples_sets_the_draws_of_a_monte_carlo_variance(decomposed, unchanged, monkeypatch):
    # The iterative path (here with the separable kernel: CG converges at once), its exact
    # variance's windows taken as beyond their limit, draws its variance; gp_reconstruct
    # passes the number of draws down and reports it.
    from hyperspy_gp import memory

    monkeypatch.setattr(memory, "MAX_STREAMED_INCREASE_COST", 0.0)
    with unchanged(decomposed):
        rec = gp_reconstruct(decomposed, components=2, upsampling=2, solver="iterative", variance_samples=12)
    hyper = rec.hyperparameters
    assert hyper["variance_samples"] == 12
    assert hyper["variance_standard_error"].shape == (40, 36, 2) and (rec.variance.data > 0).all()
    # An exact variance ignores it.
    exact = gp_reconstruct(decomposed, components=2, variance_samples=12)
    assert "variance_samples" not in exact.hyperparameters


def test_windows_of_a_shorter_margin_report_their_bound_per_pixel(decomposed, unchanged, monkeypatch):
    # The iterative path's variance by windows of 3 length scales only (the full margin
    # taken as unavailable): not exact, no draws, its bound reported for every pixel.
    import torch

    from hyperspy_gp.gp import window_variance

    monkeypatch.setattr(window_variance, "MARGIN_ERROR_BOUNDS", {3.0: 1e-3})
    with unchanged(decomposed):
        rec = gp_reconstruct(decomposed, components=2, upsampling=2, solver="iterative")
    hyper = rec.hyperparameters
    assert hyper["variance_window_lengthscales"] == 3.0 and "variance_samples" not in hyper
    error = np.moveaxis(hyper["variance_standard_error"], -1, 0)
    assert error.shape == rec.variance.data.shape
    # 1e-3, or a tenth or a hundredth of it for length scales of at least 3 or 4 px.
    bound = window_variance.margin_error_bound(3.0, torch.as_tensor(hyper["lengthscale_px"]))
    assert bound in (1e-3, 1e-4, 1e-5)
    np.testing.assert_allclose(error, bound * rec.variance.data, rtol=1e-6)
    stored = rec.signal.metadata.GP_reconstruction.hyperparameters
    assert stored.variance_window_lengthscales == 3.0


def test_iterative_solver_reproduces_the_exact_matern_reconstruction(decomposed, unchanged):
    options = {"components": 2, "upsampling": 2, "kernel": "matern"}
    exact = gp_reconstruct(decomposed, **options)  # dense eigendecomposition (360 pixels)
    with unchanged(decomposed):
        iterative = gp_reconstruct(decomposed, solver="iterative", **options)
    assert iterative.signal.metadata.GP_reconstruction.settings.solver == "iterative"
    # Along the flat likelihood ridge of these smooth maps (length scales beyond the scan)
    # the stochastic log-determinant may stop at another length scale; the maps agree.
    scale = np.abs(exact.loadings.data).max()
    np.testing.assert_allclose(iterative.loadings.data, exact.loadings.data, rtol=0, atol=0.01 * scale)
    hyper = iterative.hyperparameters
    np.testing.assert_allclose(hyper["noise_variance"], exact.hyperparameters["noise_variance"], rtol=0.1)
    # The variance is exact too (window by window; here one window is the whole scan),
    # not a Monte-Carlo estimate: it differs from the exact path's as the fitted
    # hyperparameters do (0.5 % at most measured; 47 % too high, then within a
    # standard error of about 1 %, when it was drawn).
    assert "variance_standard_error" not in hyper and "variance_samples" not in hyper
    np.testing.assert_allclose(iterative.variance.data, exact.variance.data, rtol=0.02)


def test_iterative_solver_with_masked_pixels_reproduces_the_exact_matern_reconstruction(unchanged):
    # A navigation_mask: CG on the observed values, against the dense path of this small scan.
    s = atomic_eels_spectrum_image(shape=(20, 18), n_channels=80, seed=1, signal_type="EELS_GP")
    mask = np.zeros(s.axes_manager.navigation_shape, dtype=bool)  # (x, y)
    mask[[3, 9, 14], [4, 11, 15]] = True  # rows 4, 11, 15
    s.decomposition(output_dimension=4, navigation_mask=mask, print_info=False)
    options = {"components": 2, "upsampling": 2, "kernel": "matern"}
    exact = gp_reconstruct(s, **options)
    assert exact.signal.metadata.GP_reconstruction.settings.masked_solver == "schur"
    with unchanged(s):
        iterative = gp_reconstruct(s, solver="iterative", **options)
    settings = iterative.signal.metadata.GP_reconstruction.settings
    assert settings.solver == "iterative" and settings.masked_solver == "iterative"
    assert settings.missing_pixels == 3
    scale = np.abs(exact.loadings.data).max()
    np.testing.assert_allclose(iterative.loadings.data, exact.loadings.data, rtol=0, atol=0.01 * scale)
    np.testing.assert_allclose(iterative.hyperparameters["noise_variance"], exact.hyperparameters["noise_variance"],
                               rtol=0.1)
    # The variance is exact, window by window (tests/gp/test_window_variance.py checks it
    # against dense algebra), not a Monte-Carlo estimate.
    assert "variance_standard_error" not in iterative.hyperparameters
    # The masked pixels, predicted with more uncertainty than their measured neighbours.
    # (Their variance follows the length scale, which, as on complete scans, the
    # stochastic log-determinant may settle elsewhere along the flat ridge of these
    # smooth maps, so it is not compared with the exact path's.)
    variance = iterative.variance.data
    for row, column in zip((8, 22, 30), (6, 18, 28)):  # the masked pixels on the 2× grid
        neighbours = variance[:, [row - 2, row + 2, row, row], [column, column, column - 2, column + 2]]
        assert (variance[:, row, column] > neighbours.max(axis=1)).all()


def test_a_sparse_scan_with_the_matern_kernel_is_solved_on_its_measured_pixels(unchanged, monkeypatch):
    # 15 % of a 72 × 72 scan measured: few measured values, cheaper on the dense path than
    # the iterative one's 4400 missing pixels; its kernel then covers the measured pixels
    # only (never the 5184 × 5184 matrix of the whole grid).
    from hyperspy_gp.gp.kernels import GridKernel

    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:72, :72]
    truth = np.stack([np.sin(xx / 5.0) * np.cos(yy / 6.0), np.cos(xx / 7.0 + yy / 9.0)], -1)
    maps = truth + 0.05 * rng.standard_normal(truth.shape)
    missing = rng.random((72, 72)) > 0.15
    maps[missing] = np.nan
    s = _with_missing_pixels(maps, np.abs(rng.standard_normal((16, 2))) + 0.1)
    whole_grid = GridKernel.factors

    def factors(self, lengthscale):
        assert self.kind == "separable", "the non-separable kernel's n × n factor was formed"
        return whole_grid(self, lengthscale)

    monkeypatch.setattr(GridKernel, "factors", factors)
    with unchanged(s):
        rec = gp_reconstruct(s, components=2, kernel="matern")
    settings = rec.signal.metadata.GP_reconstruction.settings
    assert settings.solver == "dense" and settings.masked_solver == "dense"
    assert settings.missing_pixels == int(missing.sum())
    loadings = np.moveaxis(rec.loadings.data, 0, -1)
    error = np.abs(loadings[missing] - truth[missing])
    assert (np.sqrt((error**2).mean(0)) < 0.05).all()  # the unmeasured pixels, predicted (noise 0.05)
    assert (np.percentile(error, 99, axis=0) < 0.15).all()
    variance = np.moveaxis(rec.variance.data, 0, -1)
    assert (variance[missing].mean(0) > variance[~missing].mean(0)).all()
    # Forced iterative: CG preconditioned by the separable model's block on the measured
    # pixels (built from them, 778 against 4406 missing), the same maps.
    with unchanged(s):
        iterative = gp_reconstruct(s, components=2, kernel="matern", solver="iterative")
    settings = iterative.signal.metadata.GP_reconstruction.settings
    assert settings.solver == "iterative" and settings.masked_solver == "iterative"
    maps_iterative = np.moveaxis(iterative.loadings.data, 0, -1)
    error = np.abs(maps_iterative[missing] - truth[missing])
    assert (np.sqrt((error**2).mean(0)) < 0.05).all()
    assert np.abs(maps_iterative - loadings).max() < 0.05
    variance = np.moveaxis(iterative.variance.data, 0, -1)
    assert (variance[missing].mean(0) > variance[~missing].mean(0)).all()


def test_the_matern_kernel_on_large_scans_takes_the_iterative_path():
    from hyperspy_gp.gp.iterative_missing import max_missing_pixels
    from hyperspy_gp.request import Request, choose_solver

    maps = np.random.default_rng(0).normal(size=(70, 60, 2))  # 4200 pixels > 4096

    def request(solver):
        return Request([0, 1], "parallel", 1, None, "matern", 1, solver, "cpu", "float64", None)

    auto = request("auto")
    assert choose_solver(maps, auto) is None and auto.solver == "iterative" and auto.iterative
    with pytest.raises(ValueError, match="solver='auto' or 'iterative'"):
        choose_solver(maps, request("kronecker"))
    # A few missing pixels: conjugate gradients on the observed values.
    holes = maps.copy()
    holes[3, 4] = holes[50, 7] = np.nan
    for solver in ("auto", "iterative"):
        chosen = request(solver)
        observed = choose_solver(holes, chosen)
        assert chosen.solver == "iterative" and chosen.masked_solver == "iterative"
        assert observed.shape == (70, 60) and (~observed).sum() == 2
    with pytest.raises(ValueError, match="Use solver='auto', 'iterative'"):
        choose_solver(holes, request("kronecker"))
    # 70 % missing: the exact dense path on the 1260 measured pixels × 2 maps, not much
    # dearer than the iterative one.
    sparse = maps.copy()
    sparse[np.random.default_rng(1).random((70, 60)) < 0.7] = np.nan
    chosen = request("auto")
    assert choose_solver(sparse, chosen) is not None and chosen.solver == "dense"
    # On 128² with too many measured values for the dense path: iterative, its
    # preconditioner built from the missing pixels (30 % missing) or from the measured ones
    # (75 % missing).
    for fraction in (0.3, 0.75):
        many = np.random.default_rng(4).normal(size=(128, 128, 2))
        many[np.random.default_rng(5).random((128, 128)) < fraction] = np.nan
        chosen = request("auto")
        assert choose_solver(many, chosen) is not None and chosen.solver == "iterative"
    # Half of 128² missing: more than it serves for 2 maps from either side, and with
    # 16314 measured values too many for the dense path.
    large = np.random.default_rng(2).normal(size=(128, 128, 2))
    large[np.random.default_rng(3).random((128, 128)) < 0.5] = np.nan
    limit = max_missing_pixels((128, 128), 2)
    assert limit < np.isnan(large[..., 0]).sum()
    with pytest.raises(ValueError, match=rf"about {limit} missing pixels.*at most 6000 measured values"):
        choose_solver(large, request("auto"))
    with pytest.raises(ValueError, match=r"device='cuda'.*force solver='iterative' \(about \d+ s per"):
        choose_solver(large, request("auto"))  # the GPU's limit serves it; forcing it does too
    # Forced, it is served beyond the limit, with a warning of its cost (either kernel).
    n_missing = int(np.isnan(large[..., 0]).sum())
    for kernel in ("matern", "separable"):
        forced = Request([0, 1], "parallel", 1, None, kernel, 1, "iterative", "cpu", "float64", None)
        with pytest.warns(UserWarning, match=rf"{n_missing} missing pixels.*about \d+ s per likelihood evaluation on"):
            observed = choose_solver(large, forced)
        assert (observed == np.isfinite(large[..., 0])).all() and forced.masked_solver == "iterative"


def test_auto_diagonalises_the_matern_kernel_densely_only_on_small_scans(monkeypatch):
    from hyperspy_gp.gp import iterative_missing
    from hyperspy_gp.request import AUTO_DENSE_MATERN_PIXELS, MAX_DENSE_PIXELS, Request, choose_solver

    def chosen(maps, solver="auto"):
        request = Request([0, 1], "parallel", 1, None, "matern", 1, solver, "cpu", "float64", None)
        observed = choose_solver(maps, request)
        return request.solver, observed

    maps = np.random.default_rng(0).normal(size=(60, 60, 2))  # 3600 pixels
    assert AUTO_DENSE_MATERN_PIXELS < 3600 <= MAX_DENSE_PIXELS
    # Up to the limit, one dense eigendecomposition per evaluation; beyond it the
    # iterative path, which costs far less there; forced, the dense one still serves.
    assert chosen(maps[:32, :32]) == ("kronecker", None)
    assert chosen(maps[:32, :33]) == ("iterative", None)
    assert chosen(maps) == ("iterative", None)
    assert chosen(maps, "kronecker") == ("kronecker", None)
    # Chosen by "auto" on a complete scan within MAX_DENSE_PIXELS: a variance the
    # iterative posterior would draw comes from the dense eigenbasis instead.
    for grid, solver, dense_variance in (((60, 60), "auto", True), ((60, 60), "iterative", False),
                                         ((70, 60), "auto", False)):
        request = Request([0, 1], "parallel", 1, None, "matern", 1, solver, "cpu", "float64", None)
        choose_solver(np.zeros((*grid, 2)), request)
        assert request.solver == "iterative" and request.dense_variance is dense_variance
    # Missing pixels: conjugate gradients on the observed values, as on large scans.
    holes = maps.copy()
    holes[3, 4] = holes[50, 7] = np.nan
    solver, observed = chosen(holes)
    assert solver == "iterative" and (~observed).sum() == 2
    assert chosen(holes[:32, :32])[0] == "kronecker"  # the Schur complement on the dense eigenbasis
    # Where the iterative path does not serve, the exact paths of small scans do, as
    # before: a scan line without data (FFT products need evenly spaced lines), or
    # missing pixels beyond its cost limit (no refusal below MAX_DENSE_PIXELS).
    gap = maps.copy()
    gap[:, 7] = np.nan  # the iterative path: the empty line as missing pixels
    solver, observed = chosen(gap)
    assert solver == "iterative" and observed.shape == (60, 60) and (~observed).sum() == 60
    monkeypatch.setattr(iterative_missing, "MAX_MISSING_COST", 1.0)
    assert chosen(holes)[0] == "kronecker"
    request = Request([0, 1], "parallel", 1, None, "matern", 1, "auto", "cpu", "float64", None)
    assert choose_solver(gap, request) is None and request.solver == "kronecker"  # the line left out, as before
    assert request.skipped_lines((60, 60)) == [[], [7]]


def test_a_large_complete_scan_on_the_iterative_path_starts_from_its_central_crop(monkeypatch, unchanged):
    """Reported in scan pixels (a flyback column shifts the fitted lines); the default start's optimum."""
    from hyperspy_gp.gp import warm_start

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:40, :36]  # 1440 pixels: kernel="matern" goes iterative
    maps = np.stack([np.sin(xx) * np.cos(yy / 1.1), np.cos(xx + yy / 1.3)], -1)  # short length scales
    maps = maps + 0.2 * rng.standard_normal(maps.shape)
    maps[:, 0] = np.nan  # a flyback column: left out, 40 × 35 pixels fitted
    s = _with_missing_pixels(maps, np.abs(rng.standard_normal((16, 2))) + 0.1)
    monkeypatch.setattr(warm_start, "CROP_SIDE", 16)  # 1440 ≥ 4 × 16² pixels
    with unchanged(s):
        rec = gp_reconstruct(s, components=2, kernel="matern")
    hp = rec.hyperparameters
    assert rec.signal.metadata.GP_reconstruction.settings.solver == "iterative"
    np.testing.assert_array_equal(hp["warm_start_region"], [[12, 28], [10, 26]])  # fitted columns 9-24
    assert hp["warm_start_iterations"] > 0 and hp["converged"]
    monkeypatch.setattr(warm_start, "CROP_FACTOR", np.inf)  # no crop: the default start
    cold = gp_reconstruct(s, components=2, kernel="matern").hyperparameters
    assert "warm_start_region" not in cold
    np.testing.assert_allclose(hp["log_likelihood"], cold["log_likelihood"], rtol=1e-5)
    np.testing.assert_allclose(hp["lengthscale_px"], cold["lengthscale_px"], rtol=1e-2)


def test_an_empty_line_inside_the_scan_is_fitted_as_missing_pixels_by_the_iterative_path(unchanged):
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[:40, :36]  # 1440 pixels: kernel="matern" goes iterative
    truth = np.stack([np.sin(xx / 4.0) * np.cos(yy / 5.0), np.cos(xx / 6.0 + yy / 9.0)], -1)
    maps = truth + 0.05 * rng.standard_normal(truth.shape)
    maps[17] = np.nan  # a scan line without data, inside the scan
    s = _with_missing_pixels(maps, np.abs(rng.standard_normal((16, 2))) + 0.1)
    with unchanged(s):
        rec = gp_reconstruct(s, components=2, kernel="matern")
    settings = rec.signal.metadata.GP_reconstruction.settings
    assert settings.solver == "iterative" and settings.masked_solver == "iterative"
    assert settings.skipped_lines == [[], []] and settings.missing_pixels == 36
    line = np.moveaxis(rec.loadings.data[:, 17], 0, -1)
    assert np.abs(line - truth[17]).max() < 0.1  # interpolated across the line
    variance = rec.variance.data
    assert (variance[:, 17] > variance[:, [15, 19]].max(1)).all()  # unmeasured: less sure, at every pixel


def test_forcing_the_iterative_path_beyond_its_cost_limit_warns_and_fits(unchanged, monkeypatch):
    from hyperspy_gp.gp import iterative_missing

    s, truth, missing = _two_maps_missing_at_random(seed=8, fraction=0.25, y_period=7.0)
    monkeypatch.setattr(iterative_missing, "MAX_MISSING_COST", 1.0)  # every mask beyond the limit
    with unchanged(s), pytest.warns(UserWarning, match=rf"{int(missing.sum())} missing pixels.*the limit"):
        rec = gp_reconstruct(s, components=2, kernel="matern", solver="iterative")
    settings = rec.signal.metadata.GP_reconstruction.settings
    assert settings.solver == "iterative" and settings.masked_solver == "iterative"
    loadings = np.moveaxis(rec.loadings.data, 0, -1)
    error = np.abs(loadings[missing] - truth[missing])
    assert (np.sqrt((error**2).mean(0)) < 0.05).all()  # the unmeasured pixels, predicted (noise 0.05)


def test_the_iterative_path_serves_more_missing_pixels_on_a_gpu():
    from hyperspy_gp.gp.iterative_missing import max_missing_pixels, missing_cost_limit, missing_pixel_cost
    from hyperspy_gp.request import Request, choose_solver

    # choose_solver only reads the device's name: no GPU is needed to check the choice.
    def request(device, kernel="matern", solver="auto"):
        return Request([0, 1], "parallel", 1, None, kernel, 1, solver, device, "float64", None)

    rng = np.random.default_rng(2)
    large = rng.normal(size=(128, 128, 2))
    large[rng.random((128, 128)) < 0.5] = np.nan  # refused on the CPU (above)
    observed = np.isfinite(large[..., 0])
    cost = missing_pixel_cost(observed, 2)
    assert missing_cost_limit("cpu") < cost <= missing_cost_limit("cuda")
    on_gpu = request("cuda")
    assert (choose_solver(large, on_gpu) == observed).all()
    assert on_gpu.solver == "iterative" and on_gpu.masked_solver == "iterative"
    assert max_missing_pixels((128, 128), 2, device="cuda") > (~observed).sum() > max_missing_pixels((128, 128), 2)
    # Beyond the GPU's limit too: refused, with the GPU's numbers and no advice to use one.
    huge = rng.normal(size=(512, 512, 2))
    huge[rng.random((512, 512)) < 0.5] = np.nan
    limit = max_missing_pixels((512, 512), 2, device="cuda")
    assert limit < np.isnan(huge[..., 0]).sum()
    with pytest.raises(ValueError, match=rf"about {limit} missing pixels.* on a GPU, .*kernel='separable'") as error:
        choose_solver(huge, request("cuda"))
    assert "device='cuda'" not in str(error.value) and "force solver='iterative'" in str(error.value)


def test_a_drawn_variance_on_a_small_complete_grid_is_replaced_by_the_dense_exact_one(monkeypatch):
    import torch

    from hyperspy_gp import request as request_module
    from hyperspy_gp.gp.kernels import GridKernel
    from hyperspy_gp.gp.model import GridICMModel
    from hyperspy_gp.gp.prediction import GridPosterior, make_posterior
    from hyperspy_gp.maps_gp import exact_on_small_grids

    rng = np.random.default_rng(4)
    targets = torch.as_tensor(rng.standard_normal((1, 20, 18, 2)))
    model = GridICMModel(GridKernel((20, 18), "matern"), 1, 2, rank=1, iterative=True)
    model.reset_parameters(6.0)
    coords = [model.kernel.axis_coordinates(n, 2) for n in (20, 18)]
    drawn = make_posterior(model, targets, exact_variance=False, test_coords=coords, n_samples=16)
    assert not drawn.variance_is_exact and drawn.window_lengthscales is None
    exact = exact_on_small_grids(drawn, model, targets)
    assert isinstance(exact, GridPosterior) and exact.variance_is_exact
    dense = GridICMModel(model.kernel, 1, 2, rank=1)
    dense.load_state_dict(model.state_dict())
    reference = make_posterior(dense, targets).predict(coords)
    for got, want in zip(exact.predict(coords), reference):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # Exact or windowed already, or a grid too large for one dense eigendecomposition: kept.
    windowed = make_posterior(model, targets, test_coords=coords)
    assert windowed.window_lengthscales is not None and exact_on_small_grids(windowed, model, targets) is windowed
    monkeypatch.setattr(request_module, "MAX_DENSE_PIXELS", 20 * 18 - 1)
    assert exact_on_small_grids(drawn, model, targets) is drawn


def test_the_matern_kernel_on_a_small_scan_gets_the_exact_variance_where_windows_do_not_reach(monkeypatch):
    from hyperspy_gp.gp.iterative_prediction import IterativePosterior

    # No windows planned: the iterative posterior's variance would be drawn (Monte-Carlo).
    monkeypatch.setattr(IterativePosterior, "_plan_exact_variance", lambda self, test_coords: None)
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[:40, :36]  # 1440 pixels: fitted iteratively
    truth = np.stack([np.sin(xx / 4.0) * np.cos(yy / 5.0), np.cos(xx / 6.0 + yy / 9.0)], -1)
    s = _with_decomposition(truth + 0.05 * rng.standard_normal(truth.shape),
                            np.abs(rng.standard_normal((16, 2))) + 0.1)
    rec = gp_reconstruct(s, components=2, kernel="matern", upsampling=2)
    assert rec.signal.metadata.GP_reconstruction.settings.solver == "iterative"
    assert not {"variance_standard_error", "variance_samples"} & set(rec.hyperparameters)
    assert (np.asarray(rec.variance.data) > 0).all()
    # The iterative path forced keeps its own posterior: drawn.
    forced = gp_reconstruct(s, components=2, kernel="matern", upsampling=2, solver="iterative", variance_samples=8)
    assert forced.hyperparameters["variance_samples"] == 8
