"""Spatial outlier spectra: found exactly, replaced by their neighbours, input untouched."""

import logging

import numpy as np
import pytest

import hyperspy.api as hs

from hyperspy_gp.outliers import find_spatial_outliers, remove_spatial_outliers
from hyperspy_gp.synthetic import atomic_eels_spectrum_image

#: Planted outliers (numpy order): intensity ×10, a cosmic-ray spike, a dead pixel.
BRIGHT, COSMIC, DEAD = (5, 7), (12, 3), (20, 15)


def _planted(lazy=False, seed=1):
    s = atomic_eels_spectrum_image((24, 24), n_channels=128, seed=seed)
    s.data[BRIGHT] *= 10
    spectrum = s.data[COSMIC]
    spectrum[60] += 20 * spectrum.max()  # one channel hit
    s.data[DEAD] = 0
    return s.as_lazy() if lazy else s


def _pixels(mask):
    return sorted(tuple(int(i) for i in p) for p in zip(*mask.nonzero()))


@pytest.mark.parametrize("seed", [1, 2])
def test_finds_exactly_the_planted_outliers(seed):
    assert _pixels(find_spatial_outliers(_planted(seed=seed))) == sorted([BRIGHT, COSMIC, DEAD])


def test_clean_image_has_no_outliers():
    s = atomic_eels_spectrum_image((24, 24), n_channels=128, seed=3)
    assert not find_spatial_outliers(s).any()


def test_replaced_by_mean_of_neighbours_and_rest_bit_identical(unchanged):
    s = _planted()
    with unchanged(s):
        clean = remove_spatial_outliers(s)
    assert type(clean) is type(s)
    assert clean.data.dtype == s.data.dtype
    assert clean.axes_manager.navigation_shape == s.axes_manager.navigation_shape
    mask = clean.metadata.Spatial_outliers.mask
    assert mask.dtype == bool and _pixels(mask) == sorted([BRIGHT, COSMIC, DEAD])
    assert clean.metadata.Spatial_outliers.n_outliers == 3
    np.testing.assert_array_equal(clean.data[~mask], s.data[~mask])
    for y, x in (BRIGHT, COSMIC, DEAD):
        neighbours = [s.data[y + dy, x + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
        expected = np.mean(np.asarray(neighbours, dtype=np.float64), axis=0).astype(s.data.dtype)
        np.testing.assert_array_equal(clean.data[y, x], expected)
    assert clean.metadata.General.title == s.metadata.General.title
    assert clean.axes_manager.signal_axes[0].units == "eV"


def test_adjacent_outliers_use_only_valid_neighbours():
    s = atomic_eels_spectrum_image((16, 16), n_channels=64, seed=0)
    s.data[8, 8] = 0
    s.data[8, 9] = 0
    clean = remove_spatial_outliers(s)
    assert _pixels(clean.metadata.Spatial_outliers.mask) == [(8, 8), (8, 9)]
    valid = [s.data[8 + dy, 8 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy or dx) and (dy, dx) != (0, 1)]
    np.testing.assert_array_equal(clean.data[8, 8], np.mean(np.asarray(valid, dtype=float), axis=0).astype(np.float32))


def test_lazy_input_gives_the_same_lazy_result(unchanged):
    eager = remove_spatial_outliers(_planted())
    s = _planted(lazy=True)
    with unchanged(s):
        clean = remove_spatial_outliers(s)
    assert clean._lazy
    np.testing.assert_array_equal(clean.metadata.Spatial_outliers.mask, eager.metadata.Spatial_outliers.mask)
    np.testing.assert_array_equal(clean.data.compute(), eager.data)


def test_lazy_input_chunked_over_the_scan():
    eager = remove_spatial_outliers(_planted())
    s = _planted(lazy=True)
    s.data = s.data.rechunk((5, 7, 32))
    clean = remove_spatial_outliers(s)
    np.testing.assert_array_equal(clean.data.compute(), eager.data)


def test_line_scan():
    s = atomic_eels_spectrum_image((24, 24), n_channels=128, seed=1).inav[:, 12]
    s = s.deepcopy()
    s.data[10] *= 10
    s.data[17] = 0
    clean = remove_spatial_outliers(s)
    assert _pixels(clean.metadata.Spatial_outliers.mask) == [(10,), (17,)]
    expected = np.mean(s.data[[8, 9, 11, 12]].astype(float), axis=0).astype(np.float32)
    np.testing.assert_array_equal(clean.data[10], expected)


def test_integer_data_is_rounded():
    s = _planted()
    s = hs.signals.Signal1D(s.data.astype(np.int32))
    clean = remove_spatial_outliers(s)
    assert clean.data.dtype == np.int32
    y, x = DEAD
    neighbours = np.array([s.data[y + dy, x + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
    np.testing.assert_array_equal(clean.data[DEAD], np.rint(neighbours.mean(axis=0)).astype(np.int32))


def test_non_finite_spectrum_is_an_outlier():
    s = atomic_eels_spectrum_image((12, 12), n_channels=32, seed=0)
    s.data[2, 9, 5] = np.nan
    clean = remove_spatial_outliers(s)
    assert _pixels(clean.metadata.Spatial_outliers.mask) == [(2, 9)]
    assert np.isfinite(clean.data).all()


def test_decomposition_of_the_input_is_not_carried_over():
    s = _planted()
    s.decomposition(output_dimension=2, print_info=False)
    clean = remove_spatial_outliers(s)
    assert clean.learning_results.loadings is None
    assert s.learning_results.loadings is not None


def test_mask_survives_save_and_load(tmp_path):
    clean = remove_spatial_outliers(_planted())
    clean.save(tmp_path / "clean.hspy")
    loaded = hs.load(tmp_path / "clean.hspy")
    mask = np.asarray(loaded.metadata.Spatial_outliers.mask)
    assert mask.dtype == bool
    assert _pixels(mask) == sorted([BRIGHT, COSMIC, DEAD])
    assert loaded.metadata.Spatial_outliers.n_outliers == 3


def test_outliers_are_logged(caplog):
    with caplog.at_level(logging.INFO, logger="hyperspy_gp.outliers"):
        remove_spatial_outliers(_planted())
    assert "Replaced 3 spatial outlier spectra" in caplog.text
    assert str(BRIGHT) in caplog.text


def test_mixin_method():
    s = _planted()
    s.set_signal_type("EELS_GP")
    clean = s.remove_spatial_outliers(threshold=8)
    assert type(clean).__name__ == "EELSGPSpectrum"
    assert clean.metadata.Spatial_outliers.n_outliers == 3


@pytest.mark.parametrize("threshold", [0, -1, float("nan"), "8", True])
def test_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        remove_spatial_outliers(_planted(), threshold=threshold)


@pytest.mark.parametrize("radius", [0, 1.5, True])
def test_bad_radius(radius):
    with pytest.raises(ValueError, match="radius"):
        find_spatial_outliers(_planted(), radius=radius)


def test_no_navigation():
    with pytest.raises(ValueError, match="no navigation axes"):
        remove_spatial_outliers(hs.signals.Signal1D(np.ones(16)))


def test_too_few_pixels():
    with pytest.raises(ValueError, match="at least 3"):
        remove_spatial_outliers(hs.signals.Signal1D(np.ones((2, 16))))


def test_not_a_signal():
    with pytest.raises(TypeError, match="HyperSpy signal"):
        find_spatial_outliers(np.ones((4, 4, 8)))
