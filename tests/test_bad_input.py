"""Bad input: a clear error before any fitting, or a documented correct result.

Each error case asserts the exception type and a message naming the parameter and
the fix; the fit itself is replaced by a function that fails the test, so every error
must be raised before expensive work.  Each behaviour case asserts the documented
result.  Every case also checks that the input signal is left bit-identical.
"""

import warnings
from functools import partial

import hyperspy.api as hs
import numpy as np
import pytest

from hyperspy_gp import gp_reconstruct
from hyperspy_gp.memory import MemoryBudgetError

SHAPE = (10, 9)  # (y, x)
N_CHANNELS = 24


def _smooth_maps(shape=SHAPE, n_maps=3, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    maps = [np.sin(2 * np.pi * (xx / (4 + t) + yy / (5 + t))) for t in range(n_maps)]
    return np.stack(maps, -1) + 0.05 * rng.standard_normal((*shape, n_maps))


def _decomposed(maps=None, factors=None, **signal_kwargs):
    """A Signal1D whose learning results are exactly ``maps`` (*nav, T) and ``factors``."""
    maps = _smooth_maps() if maps is None else maps
    rng = np.random.default_rng(1)
    factors = np.abs(rng.standard_normal((N_CHANNELS, maps.shape[-1]))) + 0.1 if factors is None else factors
    s = hs.signals.Signal1D(np.einsum("...t,et->...e", np.nan_to_num(maps), np.nan_to_num(factors)), **signal_kwargs)
    s.learning_results.loadings = maps.reshape(-1, maps.shape[-1]).copy()
    s.learning_results.factors = factors.copy()
    s.learning_results.decomposition_algorithm = "SVD"
    return s


def _hyperspy_decomposed(**decomposition_kwargs):
    rng = np.random.default_rng(2)
    data = np.einsum("yxt,et->yxe", np.abs(_smooth_maps()) + 1, rng.random((N_CHANNELS, 3)) + 0.5) * 50
    s = hs.signals.Signal1D(rng.poisson(data).astype(float))
    s.decomposition(output_dimension=3, print_info=False, **decomposition_kwargs)
    return s


def _with(**changes):
    def build():
        s = _decomposed()
        for path, value in changes.items():
            setattr(s.learning_results, path, value)
        return s

    return build


def _loadings_with(value, where=(3, 4), component=1):
    def build():
        maps = _smooth_maps()
        maps[where + (component,)] = value
        return _decomposed(maps)

    return build


def _constant_map():
    maps = _smooth_maps()
    maps[..., 2] = 0.7
    return _decomposed(maps)


def _nav_axis(convert):
    def build():
        s = _decomposed()
        convert(s.axes_manager.navigation_axes[0])
        return s

    return build


def _three_nav_dims():
    maps = _smooth_maps((4, 5), 2)
    maps = np.stack([maps, maps], 0)  # (2, 4, 5, 2)
    return _decomposed(maps)


def _single_spectrum():
    s = hs.signals.Signal1D(np.arange(10.0))
    s.learning_results.loadings = np.ones((1, 1))
    s.learning_results.factors = np.ones((10, 1))
    return s


def _complex():
    s = _decomposed()
    s.data = s.data.astype(complex)
    return hs.signals.ComplexSignal1D(s.data)


def _many_components():
    maps = np.concatenate([_smooth_maps(n_maps=6, seed=k) for k in range(2)], -1)
    return _decomposed(maps)


def _centred_per_pixel():
    s = _hyperspy_decomposed(centre="signal")
    return s


ERRORS = {
    # id: (signal builder, gp_reconstruct keyword arguments, exception, message pattern)
    "no decomposition": (lambda: hs.signals.Signal1D(np.zeros((4, 4, 8))), {}, ValueError,
                         r"no decomposition results\. Call s\.decomposition\(\)"),
    "component out of range": (_decomposed, {"components": 7}, ValueError,
                               r"components=7 is out of range: the decomposition has 3"),
    "component index out of range": (_decomposed, {"components": [0, 3]}, ValueError,
                                     r"components \[3\] are out of range: valid indices are 0\.\.2"),
    "negative component": (_decomposed, {"components": [-1]}, ValueError, r"components \[-1\] are out of range"),
    "zero components": (_decomposed, {"components": 0}, ValueError, "components=0 is out of range"),
    "duplicated components": (_decomposed, {"components": [1, 1]}, ValueError, r"duplicated indices: \[1, 1\]"),
    "empty components": (_decomposed, {"components": []}, ValueError, "components is empty"),
    "components not ints": (_decomposed, {"components": ["a"]}, ValueError, "components must be an int or a list"),
    "too many for the default": (_many_components, {}, ValueError, r"12 components; choose how many.*components=6"),
    "single spectrum": (_single_spectrum, {"components": 1}, ValueError, "single spectrum.*line scan or a spectrum image"),
    "3 navigation dims": (_three_nav_dims, {"components": 1}, ValueError,
                          r"1 or 2 navigation dimensions, this signal has 3.*s\.inav"),
    "image, not spectra": (lambda: hs.signals.Signal2D(np.zeros((3, 8, 8))), {}, ValueError,
                           r"spectrum image.*as_signal1D"),
    "not a signal": (lambda: np.zeros((4, 4, 8)), {}, ValueError, "expects a spectrum image"),
    "complex data": (_complex, {"components": 1}, ValueError, r"complex.*s\.real or s\.amplitude"),
    "inf in loadings": (_loadings_with(np.inf), {}, ValueError, r"components \[1\] contain inf.*decompose again"),
    "all loadings NaN": (_with(loadings=np.full((90, 3), np.nan)), {}, ValueError, "Fewer than two scan pixels"),
    "constant map": (_constant_map, {}, ValueError, r"components \[2\] are constant; leave them out of components"),
    "non-uniform nav axis": (_nav_axis(lambda a: a.convert_to_non_uniform_axis()), {}, ValueError,
                             r"not uniform.*convert_to_uniform_axis"),
    "non-linear nav axis": (_nav_axis(lambda a: a.convert_to_functional_data_axis(expression="x**2")), {},
                            ValueError, r"not uniform.*regular scan grid"),
    "centre='signal'": (_centred_per_pixel, {}, NotImplementedError, r"centre='signal'.*centre='navigation'"),
    "upsampling 0": (_decomposed, {"upsampling": 0}, ValueError, r"upsampling must be an integer >= 1, not 0"),
    "upsampling negative": (_decomposed, {"upsampling": -2}, ValueError, "upsampling must be an integer >= 1"),
    "upsampling 1.5": (_decomposed, {"upsampling": 1.5}, ValueError, r"upsampling must be an integer >= 1, not 1\.5"),
    "upsampling 2.0": (_decomposed, {"upsampling": 2.0}, ValueError, "upsampling must be an integer"),
    "upsampling True": (_decomposed, {"upsampling": True}, ValueError, "upsampling must be an integer"),
    "bounds reversed": (_decomposed, {"lengthscale_bounds": (3, 2)}, ValueError,
                        r"lengthscale_bounds=\(3, 2\): the lower bound must be smaller"),
    "bounds equal": (_decomposed, {"lengthscale_bounds": (2, 2)}, ValueError, "lower bound must be smaller"),
    "bound zero": (_decomposed, {"lengthscale_bounds": (0, 2)}, ValueError,
                   "lower length-scale bound must be a positive number of pixels"),
    "bound negative": (_decomposed, {"lengthscale_bounds": (None, -1)}, ValueError,
                       "upper length-scale bound must be a positive number"),
    "bound infinite": (_decomposed, {"lengthscale_bounds": (1, np.inf)}, ValueError, "upper length-scale bound"),
    "bound NaN": (_decomposed, {"lengthscale_bounds": (np.nan, 3)}, ValueError, "lower length-scale bound"),
    "bounds not a pair": (_decomposed, {"lengthscale_bounds": (1, 2, 3)}, ValueError,
                          r"lengthscale_bounds must be a pair \(lo, hi\)"),
    "bounds unknown string": (_decomposed, {"lengthscale_bounds": "wide"}, ValueError,
                              "lengthscale_bounds must be a pair"),
    "unknown device": (_decomposed, {"device": "tpu"}, ValueError, r"device must be 'cpu' or 'cuda'"),
    "unknown dtype": (_decomposed, {"dtype": "float16"}, ValueError, r"dtype must be 'float64' or 'float32'"),
    "unknown mode": (_decomposed, {"mode": "joint"}, ValueError, r"mode must be one of \('parallel', 'independent'\)"),
    "negative rank": (_decomposed, {"rank": -1}, ValueError, "rank must be an integer >= 0"),
    "chunks zero": (_decomposed, {"chunks": 0}, ValueError, "chunks must be a positive number of rows"),
    "over the memory budget": (_decomposed, {"upsampling": 8, "memory_budget": "1 MB"}, MemoryBudgetError,
                               r"would need about [0-9.]+ MiB .*more than memory_budget=0.95 MiB.*lazy_output=True"),
    "over budget, lazy": (_decomposed, {"upsampling": 8, "memory_budget": 10_000, "lazy_output": True},
                          MemoryBudgetError, r"GP maps and variances .*a smaller upsampling"),
    "bad memory budget": (_decomposed, {"memory_budget": "lots"}, ValueError, r"memory_budget='lots' is not a size"),
}


@pytest.fixture
def no_fitting(monkeypatch):
    """Fail the test if a GP fit starts: errors must come before expensive work."""
    import hyperspy_gp.gp.training as training

    def fit_model(*args, **kwargs):
        raise AssertionError("fitting started before the bad input was detected")

    monkeypatch.setattr(training, "fit_model", fit_model)


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_bad_input_is_refused_before_fitting(case, no_fitting, unchanged):
    build, kwargs, error, match = ERRORS[case]
    s = build()
    check = unchanged(s) if isinstance(s, hs.signals.BaseSignal) else _nothing()
    with check, pytest.raises(error, match=match):
        gp_reconstruct(s, **kwargs)


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


def test_cuda_without_a_gpu_says_use_cpu(monkeypatch, no_fitting, unchanged):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = _decomposed()
    with unchanged(s), pytest.raises(ValueError, match=r"device='cuda' was requested but torch sees no GPU. Use device='cpu'"):
        gp_reconstruct(s, device="cuda")


def _pretend_a_gpu_with(monkeypatch, free_bytes):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")


def test_cuda_without_enough_free_gpu_memory_is_refused_before_fitting(monkeypatch, no_fitting, unchanged):
    _pretend_a_gpu_with(monkeypatch, free_bytes=2**20)
    s = _decomposed()
    with unchanged(s), pytest.raises(MemoryBudgetError, match=(
            r"would need about [0-9.]+ MiB of GPU memory .*more than the 1.00 MiB free on Test GPU\. "
            r"Try dtype='float32'.*device='cpu'")):
        gp_reconstruct(s, device="cuda", upsampling=8)


def test_the_gpu_memory_check_passes_when_the_gp_fits_and_is_off_with_an_infinite_budget(monkeypatch):
    from hyperspy_gp.memory import check_device_memory, estimate_memory

    estimate = estimate_memory((64, 64), 6, 100, upsampling=4)
    _pretend_a_gpu_with(monkeypatch, free_bytes=max(estimate.fitting, estimate.prediction))
    check_device_memory(estimate, "cuda")
    _pretend_a_gpu_with(monkeypatch, free_bytes=max(estimate.fitting, estimate.prediction) - 1)
    with pytest.raises(MemoryBudgetError):
        check_device_memory(estimate, "cuda")
    check_device_memory(estimate, "cuda", memory_budget=float("inf"))


def test_the_gpu_running_out_of_memory_during_the_fit_says_what_to_do(monkeypatch, unchanged):
    import torch

    import hyperspy_gp.gp.training as training

    def fit_model(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nMore details.")

    monkeypatch.setattr(training, "fit_model", fit_model)
    s = _decomposed()
    with unchanged(s), pytest.raises(MemoryBudgetError, match=(
            r"The GPU ran out of memory while fitting the GP \(CUDA out of memory\. Tried to allocate 2\.00 GiB\.\)"
            r"\. Try dtype='float32'.*device='cpu'")) as error:
        gp_reconstruct(s)
    assert isinstance(error.value.__cause__, torch.cuda.OutOfMemoryError)


def test_memory_budget_error_is_also_a_memory_error(no_fitting):
    with pytest.raises(MemoryError):
        gp_reconstruct(_decomposed(), upsampling=8, memory_budget=1e5)


# ------------------------------------------------------ documented behaviour


def _reconstruct(s, **kwargs):
    kwargs.setdefault("max_iter", 200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = gp_reconstruct(s, **kwargs)
    return rec, [str(w.message) for w in caught]


def _integer_data_float_decomposition():
    s = _hyperspy_decomposed()
    counts = hs.signals.Signal1D(np.rint(s.data).astype(np.int32))
    with pytest.raises(TypeError, match="change_dtype"):  # HyperSpy refuses to decompose integers
        counts.deepcopy().decomposition(print_info=False)
    counts.learning_results = s.learning_results  # computed on the float copy
    return counts


def _check_integer(s, rec, messages):
    assert s.data.dtype == np.int32
    assert rec.signal.data.dtype == np.float64
    np.testing.assert_allclose(rec.signal.data, rec.loadings.data.transpose(1, 2, 0) @ s.learning_results.factors.T)


def _nan_pixel_masked_out():
    rng = np.random.default_rng(3)
    data = np.einsum("yxt,et->yxe", np.abs(_smooth_maps()) + 1, rng.random((N_CHANNELS, 3)) + 0.5) * 50
    data[3, 4, 5] = np.nan
    s = hs.signals.Signal1D(data)
    mask = np.zeros(s.axes_manager.navigation_shape, dtype=bool)
    mask[4, 3] = True  # (x, y): the NaN pixel
    s.decomposition(output_dimension=3, navigation_mask=mask, print_info=False)
    return s


def _check_missing_pixel_predicted(s, rec, messages, solver="kronecker"):
    settings = rec.signal.metadata.GP_reconstruction.settings
    assert settings.solver == solver and settings.missing_pixels == 1
    assert np.isfinite(rec.loadings.data).all() and np.isfinite(rec.signal.data).all()
    assert np.isnan(s.learning_results.loadings).any()  # HyperSpy leaves the masked pixel NaN


def _signal_mask_decomposition():
    mask = np.zeros(N_CHANNELS, dtype=bool)
    mask[:4] = True
    return _hyperspy_decomposed(signal_mask=mask)


def _check_signal_mask(s, rec, messages):
    assert any("4 of the 24 channels have no spectral factors" in m and "s.isig" in m for m in messages)
    assert np.isnan(rec.signal.data[..., :4]).all()
    assert np.isfinite(rec.signal.data[..., 4:]).all() and np.isfinite(rec.loadings.data).all()


def _non_uniform_signal_axis():
    s = _decomposed()
    s.axes_manager.signal_axes[0].convert_to_functional_data_axis(expression="x**2")
    return s


def _check_signal_axis_kept(s, rec, messages):
    np.testing.assert_array_equal(rec.signal.axes_manager.signal_axes[0].axis, s.axes_manager.signal_axes[0].axis)


def _check_finite(s, rec, messages):
    hp = rec.hyperparameters
    assert np.isfinite(rec.loadings.data).all() and np.isfinite(rec.variance.data).all()
    assert (rec.variance.data >= 0).all()
    assert hp["jitter"].shape == hp["noise_variance"].shape and (hp["jitter"] >= 0).all()
    jittered = (hp["jitter"] > 0).any()
    assert jittered == any("jitter" in m for m in messages)


def _identical_maps():
    maps = _smooth_maps(n_maps=1)
    return _decomposed(np.repeat(maps, 3, axis=-1))


def _noise_free_maps():
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    return _decomposed(np.stack([np.sin(xx / 3.0) + np.cos(yy / 4.0), 0.1 * xx + 0.2 * yy], -1))


def _line_scan_of_two_pixels():
    return _decomposed(_smooth_maps((1, 2), 2)[0])


BEHAVIOUR = {
    # id: (signal builder, keyword arguments, check(signal, reconstruction, warning messages))
    "integer data, float decomposition": (_integer_data_float_decomposition, {}, _check_integer),
    "NaN pixel excluded by navigation_mask": (_nan_pixel_masked_out, {}, _check_missing_pixel_predicted),
    "NaN pixel excluded, dense solver": (_nan_pixel_masked_out, {"solver": "dense"},
                                         partial(_check_missing_pixel_predicted, solver="dense")),
    "decomposition with signal_mask": (_signal_mask_decomposition, {}, _check_signal_mask),
    "non-linear signal axis": (_non_uniform_signal_axis, {"components": 2}, _check_signal_axis_kept),
    "identical maps, parallel GP": (_identical_maps, {}, _check_finite),
    "identical maps, full-rank B": (_identical_maps, {"rank": 3}, _check_finite),
    "length scales ≫ scan (500–1000 px)": (_decomposed, {"lengthscale_bounds": (500, 1000)}, _check_finite),
    "long length scales, float32": (_decomposed, {"lengthscale_bounds": (500, 1000), "dtype": "float32"},
                                    _check_finite),
    "noise-free maps": (_noise_free_maps, {}, _check_finite),
    "noise-free maps, missing pixel": (_loadings_with(np.nan), {"lengthscale_bounds": (500, 1000)}, _check_finite),
    "two-pixel line scan": (_line_scan_of_two_pixels, {}, _check_finite),
}


@pytest.mark.parametrize("case", list(BEHAVIOUR), ids=list(BEHAVIOUR))
def test_awkward_input_gives_the_documented_result(case, unchanged):
    build, kwargs, check = BEHAVIOUR[case]
    s = build()
    with unchanged(s):
        rec, messages = _reconstruct(s, **kwargs)
    check(s, rec, messages)


def test_jitter_is_warned_and_recorded_when_the_final_covariance_needs_it(monkeypatch, unchanged):
    """Force degenerate final hyperparameters: the posterior needs jitter and says so."""
    import torch

    import hyperspy_gp.gp.training as training
    from hyperspy_gp.gp.cholesky import JitterWarning

    real_fit = training.fit_model

    def degenerate_fit(model, targets, **kwargs):
        result = real_fit(model, targets, max_iter=1)
        with torch.no_grad():
            model._set("raw_lengthscale", torch.full_like(model.raw_lengthscale, 1e4))
            model._set("raw_noise", torch.full_like(model.raw_noise, 1e-6))
            model.task_factor.fill_(1e8)
        return result

    monkeypatch.setattr(training, "fit_model", degenerate_fit)
    s = _identical_maps()
    with unchanged(s), pytest.warns(JitterWarning, match=r"hyperparameters\['jitter'\]"):
        rec = gp_reconstruct(s)
    jitter = rec.hyperparameters["jitter"]
    assert (jitter > 0).all()
    np.testing.assert_array_equal(rec.signal.metadata.GP_reconstruction.hyperparameters.jitter, jitter)
    assert np.isfinite(rec.loadings.data).all() and np.isfinite(rec.variance.data).all()
