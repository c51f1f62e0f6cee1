"""Tests for hyperspy_gp.synthetic (synthetic data with known ground truth)."""

import subprocess
import sys

import numpy as np
import pytest

from hyperspy_gp.synthetic import (
    LATTICE_PARAMETER_NM,
    add_noise,
    atomic_eels_spectrum_image,
    atomic_lattice_maps,
    normalized_cross_correlation,
    similarity_maps,
)

SHAPE = (24, 24)
N_CHANNELS = 300


def _peak_frequency_x(image: np.ndarray) -> int:
    """Index of the strongest non-zero spatial frequency along x (ky = 0)."""
    spectrum = np.abs(np.fft.rfft(image - image.mean(), axis=1)).mean(axis=0)
    return int(np.argmax(spectrum[1:]) + 1)


@pytest.fixture(scope="module")
def eels():
    return atomic_eels_spectrum_image(SHAPE, n_channels=N_CHANNELS, seed=3,
                                      return_truth=True)


def _channel(s, energy):
    return s.axes_manager.signal_axes[0].value2index(energy)


# --------------------------------------------------------------------------
# atomic_lattice_maps
# --------------------------------------------------------------------------


def test_lattice_maps_keys_shapes_ranges():
    maps = atomic_lattice_maps((30, 36))
    assert set(maps) == {"A", "B", "O", "thickness"}
    for name in "ABO":
        assert maps[name].shape == (30, 36)
        assert maps[name].min() >= 0.0 and maps[name].max() <= 1.0
        assert maps[name].max() > 0.45  # columns are actually present
    assert maps["thickness"].min() == pytest.approx(0.8)
    assert maps["thickness"].max() == pytest.approx(1.2)


@pytest.mark.parametrize("name", ["A", "B", "O"])
def test_lattice_maps_have_atomic_period(name):
    # 48 px wide, 6 px lattice -> 8 periods (O has columns every half cell
    # along x on some rows, but its fundamental is still 8 or 16).
    maps = atomic_lattice_maps((48, 48), spacing=6.0)
    assert _peak_frequency_x(maps[name]) in ((8,) if name != "O" else (8, 16))
    assert _peak_frequency_x(maps[name].T) in ((8,) if name != "O" else (8, 16))


def test_sublattices_are_distinct():
    maps = atomic_lattice_maps((48, 48))
    assert normalized_cross_correlation(maps["A"], maps["B"]) < 0.1
    # A and B columns never coincide.
    assert np.all(np.minimum(maps["A"], maps["B"]) < 0.2)


def test_b_map_has_long_range_modulation():
    maps = atomic_lattice_maps((48, 48), spacing=6.0)
    # Column peak heights: A constant, B modulated between ~0.5 and ~1.
    peaks = {n: [maps[n][i:i + 6, j:j + 6].max() for i in range(0, 48, 6)
                 for j in range(0, 48, 6)] for n in "AB"}
    assert np.ptp(peaks["A"]) < 0.05
    assert np.ptp(peaks["B"]) > 0.3
    assert min(peaks["B"]) >= 0.45


def test_lattice_maps_seed():
    a = atomic_lattice_maps((20, 20))
    b = atomic_lattice_maps((20, 20))
    np.testing.assert_array_equal(a["A"], b["A"])
    c1 = atomic_lattice_maps((20, 20), seed=1)
    c2 = atomic_lattice_maps((20, 20), seed=1)
    d = atomic_lattice_maps((20, 20), seed=2)
    np.testing.assert_array_equal(c1["B"], c2["B"])
    assert not np.allclose(c1["B"], d["B"])


# --------------------------------------------------------------------------
# atomic_eels_spectrum_image
# --------------------------------------------------------------------------


def test_eels_signal_class_shape_dtype(eels):
    import exspy

    s, _ = eels
    assert isinstance(s, exspy.signals.EELSSpectrum)
    assert not s._lazy
    assert s.data.shape == SHAPE + (N_CHANNELS,)
    assert s.data.dtype == np.float32


def test_eels_counts_are_poisson(eels):
    s, _ = eels
    assert s.data.min() >= 0
    np.testing.assert_array_equal(s.data, np.round(s.data))
    # Mean counts near the offset follow the dose (thickness ~1, edges absent).
    assert 150 < s.data[..., :5].mean() < 260


def test_eels_axes(eels):
    s, _ = eels
    y, x = s.axes_manager.navigation_axes[::-1]
    for ax, name in ((y, "y"), (x, "x")):
        assert ax.name == name and ax.units == "nm"
        assert ax.scale == pytest.approx(LATTICE_PARAMETER_NM / 6.0)
    e = s.axes_manager.signal_axes[0]
    assert e.name == "Energy loss" and e.units == "eV"
    assert e.offset == 400.0 and e.scale == 1.0 and e.size == N_CHANNELS


def test_eels_metadata(eels):
    s, _ = eels
    md = s.metadata
    assert md.General.title == "Synthetic atomic-resolution EELS"
    assert md.Signal.signal_type == "EELS"
    assert md.Acquisition_instrument.TEM.beam_energy == 200
    assert md.Acquisition_instrument.TEM.Detector.EELS.collection_angle > 0


@pytest.mark.parametrize("onset", [456.0, 532.0, 640.0])
def test_eels_edge_onsets_in_mean_spectrum(eels, onset):
    s, _ = eels
    mean = s.data.mean(axis=(0, 1))
    i = _channel(s, onset)
    # Despite the decaying background, counts rise across each edge.
    assert mean[i + 1:i + 6].mean() > 1.05 * mean[i - 8:i - 2].mean()


@pytest.mark.parametrize("name, energy", [("B", 458.0), ("O", 535.0), ("A", 642.0)])
def test_eels_edges_follow_their_maps(eels, name, energy):
    s, truth = eels
    m = truth["maps"][name]
    i = _channel(s, energy)
    lo, hi = np.quantile(m, [0.1, 0.9])
    on = s.data[m >= hi][:, i].mean()
    off = s.data[m <= lo][:, i].mean()
    assert on > 1.2 * off


def test_eels_truth(eels):
    s, truth = eels
    assert set(truth) == {"maps", "edges", "background"}
    assert set(truth["edges"]) == {"A", "B", "O"}
    assert {"A", "B", "O"} <= set(truth["maps"])
    for edge in truth["edges"].values():
        assert edge.shape == (N_CHANNELS,) and edge.min() >= 0
    bg = truth["background"]
    assert bg.shape == (N_CHANNELS,) and np.all(np.diff(bg) < 0)
    assert bg[0] == pytest.approx(1.0)
    # Noiseless mean ~ data mean (Poisson is unbiased).
    mean = 200.0 * truth["maps"]["thickness"][..., None] * (
        bg + sum(truth["maps"][k][..., None] * e for k, e in truth["edges"].items()))
    assert s.data.mean() == pytest.approx(mean.mean(), rel=0.01)


def test_eels_deterministic_and_seed_dependent():
    kw = dict(shape=(8, 8), n_channels=40)
    a = atomic_eels_spectrum_image(seed=5, **kw).data
    b = atomic_eels_spectrum_image(seed=5, **kw).data
    c = atomic_eels_spectrum_image(seed=6, **kw).data
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_eels_lazy():
    kw = dict(shape=(20, 12), n_channels=50, lazy=True, chunk_rows=6)
    s = atomic_eels_spectrum_image(seed=1, **kw)
    assert s._lazy
    assert s.data.chunks[0] == (6, 6, 6, 2)
    assert s.axes_manager.signal_axes[0].units == "eV"
    d = s.data.compute()
    assert d.shape == (20, 12, 50) and d.dtype == np.float32
    assert np.all(np.isfinite(d)) and d.min() >= 0
    again = atomic_eels_spectrum_image(seed=1, **kw).data.compute()
    np.testing.assert_array_equal(d, again)
    other = atomic_eels_spectrum_image(seed=2, **kw).data.compute()
    assert not np.array_equal(d, other)
    # Chunks use different noise streams: no two chunks repeat each other.
    assert not np.array_equal(d[:2], d[6:8])


def test_eels_generic_signal_type():
    import exspy
    import hyperspy.api as hs

    s = atomic_eels_spectrum_image((6, 6), n_channels=30, signal_type="")
    assert isinstance(s, hs.signals.Signal1D)
    assert not isinstance(s, exspy.signals.EELSSpectrum)
    assert s.metadata.Acquisition_instrument.TEM.beam_energy == 200
    lazy = atomic_eels_spectrum_image((6, 6), n_channels=30, signal_type="", lazy=True)
    assert lazy._lazy


def test_eels_gp_signal_type():
    pytest.importorskip("hyperspy_gp.signals.eels_gp")
    s = atomic_eels_spectrum_image((6, 6), n_channels=30, signal_type="EELS_GP")
    assert s.metadata.Signal.signal_type == "EELS_GP"
    assert type(s).__name__ == "EELSGPSpectrum"
    lazy = atomic_eels_spectrum_image((6, 6), n_channels=30, signal_type="EELS_GP",
                                      lazy=True)
    assert lazy._lazy and type(lazy).__name__ == "LazyEELSGPSpectrum"


# --------------------------------------------------------------------------
# similarity_maps / add_noise
# --------------------------------------------------------------------------


def test_similarity_maps():
    m = similarity_maps((48, 48), period=(8.0, 8.0))
    assert m.shape == (3, 48, 48)
    assert m.min() == pytest.approx(0.0) and m.max() == pytest.approx(1.0)
    for k in range(3):
        assert m[k].min() == pytest.approx(0.0) and m[k].max() == pytest.approx(1.0)
    np.testing.assert_array_equal(m[0], m[2])
    assert not np.allclose(m[0], m[1])
    # 48 px / 8 px = 6 periods along x for map 1, 3 for map 2; y is unchanged.
    assert _peak_frequency_x(m[0]) == 6
    assert _peak_frequency_x(m[1]) == 3
    assert _peak_frequency_x(m[0].T) == _peak_frequency_x(m[1].T) == 6


def test_add_noise_per_map_sigma():
    maps = similarity_maps((64, 64))
    before = maps.copy()
    sigma = [0.05, 0.2, 0.5]
    noisy = add_noise(maps, sigma, seed=0)
    np.testing.assert_array_equal(maps, before)
    assert noisy.shape == maps.shape
    std = (noisy - maps).std(axis=(1, 2))
    np.testing.assert_allclose(std, sigma, rtol=0.1)
    np.testing.assert_array_equal(noisy, add_noise(maps, sigma, seed=0))
    assert not np.array_equal(noisy, add_noise(maps, sigma, seed=1))


def test_add_noise_scalar_sigma():
    maps = similarity_maps((64, 64))
    std = (add_noise(maps, 0.1, seed=0) - maps).std(axis=(1, 2))
    np.testing.assert_allclose(std, 0.1, rtol=0.1)
    with pytest.raises(ValueError):
        add_noise(maps, [0.1, 0.2])


# --------------------------------------------------------------------------
# normalized_cross_correlation
# --------------------------------------------------------------------------


def test_ncc_values():
    m = similarity_maps((32, 32))[1]
    assert normalized_cross_correlation(m, m) == pytest.approx(1.0)
    assert normalized_cross_correlation(m, -m) == pytest.approx(-1.0)
    assert normalized_cross_correlation(m, 3 * m + 2) == pytest.approx(1.0)
    noisy = add_noise(m[None], 0.2, seed=0)[0]
    assert 0.5 < normalized_cross_correlation(m, noisy) < 1.0


def test_ncc_ignores_nan_pairs():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 10, 10))
    a_nan, b_nan = a.copy(), b.copy()
    a_nan[0, 0] = np.nan
    b_nan[3, 4] = np.nan
    keep = np.isfinite(a_nan) & np.isfinite(b_nan)
    expected = np.corrcoef(a[keep], b[keep])[0, 1]
    assert normalized_cross_correlation(a_nan, b_nan) == pytest.approx(expected)


def test_ncc_shape_mismatch():
    with pytest.raises(ValueError):
        normalized_cross_correlation(np.zeros((3, 3)), np.zeros((3, 4)))


# --------------------------------------------------------------------------
# Import hygiene
# --------------------------------------------------------------------------


def test_import_does_not_pull_torch():
    code = "import hyperspy_gp.synthetic, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
