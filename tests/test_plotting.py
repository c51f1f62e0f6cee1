"""Figures: training history, RGB composite, maps with uncertainty, spectrum with its band.

Each test checks what a figure shows against values computed here independently.
"""

import matplotlib.pyplot as plt
import numpy as np
import pytest

import hyperspy.api as hs

from hyperspy_gp import gp_reconstruct
from hyperspy_gp.plotting import (
    plot_history,
    plot_maps_with_uncertainty,
    plot_rgb_composite,
    plot_spectrum_with_band,
    rgb_composite,
    spectrum_std,
)
from hyperspy_gp.synthetic import atomic_eels_spectrum_image

N_MAPS = 3


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def spectrum_image():
    s = atomic_eels_spectrum_image((16, 16), n_channels=48, seed=0)
    s.decomposition(output_dimension=4, print_info=False)
    return s


@pytest.fixture(scope="module")
def parallel(spectrum_image):
    return gp_reconstruct(spectrum_image, components=N_MAPS, mode="parallel", upsampling=2)


@pytest.fixture(scope="module")
def independent(spectrum_image):
    return gp_reconstruct(spectrum_image, components=N_MAPS, mode="independent")


@pytest.fixture(scope="module")
def line_scan():
    s = atomic_eels_spectrum_image((16, 16), n_channels=48, seed=0).inav[:, 8].deepcopy()
    s.decomposition(output_dimension=2, print_info=False)
    return gp_reconstruct(s, components=2, mode="independent")


def _saved_and_loaded(signal, path):
    signal.save(path)
    return hs.load(path)


def _ydata(ax):
    return [np.asarray(line.get_ydata()) for line in ax.lines]


# --------------------------------------------------------------------------
# Training history
# --------------------------------------------------------------------------


def test_history_independent_one_line_per_map(independent):
    fig = plot_history(independent)
    h = independent.history
    n_iter = h["log_likelihood"].shape[0]
    ls_ax, noise_ax, b_ax, ll_ax = fig.axes
    assert len(fig.axes) == 4
    assert len(ls_ax.lines) == N_MAPS * 2  # each map has its own (y, x) length scales
    for line in ls_ax.lines + noise_ax.lines + b_ax.lines + ll_ax.lines:
        np.testing.assert_array_equal(line.get_xdata(), np.arange(n_iter))
    np.testing.assert_array_equal(ls_ax.lines[1].get_ydata(), h["lengthscale"][:, 0, 1])
    np.testing.assert_array_equal(ls_ax.lines[2].get_ydata(), h["lengthscale"][:, 1, 0])
    for i in range(N_MAPS):
        np.testing.assert_array_equal(noise_ax.lines[i].get_ydata(), h["noise"][:, i, 0])
        np.testing.assert_array_equal(b_ax.lines[i].get_ydata(), h["task_covariance"][:, i, 0, 0])
        np.testing.assert_array_equal(ll_ax.lines[i].get_ydata(), h["log_likelihood"][:, i])
    assert ls_ax.lines[0].get_label() == "component 0, y"
    assert "scan pixels" in ls_ax.get_ylabel() and "map variance = 1" in noise_ax.get_ylabel()


def test_history_parallel_shared_length_scales_and_all_of_b(parallel):
    h = parallel.history
    fig = plot_history(parallel)
    ls_ax, noise_ax, b_ax, ll_ax = fig.axes
    assert len(ls_ax.lines) == 2 and ls_ax.lines[0].get_label() == "shared, y"
    assert len(noise_ax.lines) == N_MAPS and len(b_ax.lines) == N_MAPS
    assert len(ll_ax.lines) == 1 and ll_ax.lines[0].get_label() == "joint (parallel GP)"
    np.testing.assert_array_equal(noise_ax.lines[2].get_ydata(), h["noise"][:, 0, 2])
    full = plot_history(parallel, all_b=True).axes[2]
    assert len(full.lines) == N_MAPS + N_MAPS * (N_MAPS - 1) // 2
    np.testing.assert_array_equal(full.lines[N_MAPS].get_ydata(), h["task_covariance"][:, 0, 0, 1])


@pytest.mark.parametrize("which", ["signal", "loadings"])
def test_history_after_save_and_load(parallel, tmp_path, which):
    loaded = _saved_and_loaded(getattr(parallel, which), tmp_path / "rec.hspy")
    before, after = plot_history(parallel), plot_history(loaded)
    for ax_before, ax_after in zip(before.axes, after.axes):
        assert [line.get_label() for line in ax_after.lines] == [line.get_label() for line in ax_before.lines]
        for y_before, y_after in zip(_ydata(ax_before), _ydata(ax_after)):
            np.testing.assert_allclose(y_after, y_before)


def test_history_method_of_the_reconstruction(independent):
    fig = independent.plot_history()
    assert len(fig.axes) == 4 and len(fig.axes[1].lines) == N_MAPS


def test_history_of_a_plain_signal_is_refused(spectrum_image):
    with pytest.raises(TypeError, match="GPReconstruction"):
        plot_history(spectrum_image)


def test_history_shows_the_two_regimes():
    """Length scale rises from its start then settles; the noise falls from its start.

    A lattice of period 12 px has length scales larger than the 3 px start, so the fit
    must first grow them (regime 1) and then only refine (regime 2).
    """
    s = atomic_eels_spectrum_image((32, 32), n_channels=96, seed=0, dose=100, spacing=12.0)
    s.decomposition(output_dimension=2, print_info=False)
    rec = gp_reconstruct(s, components=1, mode="independent")
    lines = plot_history(rec).axes
    ls = np.asarray(lines[0].lines[0].get_ydata())  # component 0, y
    noise = np.asarray(lines[1].lines[0].get_ydata())
    start, final = ls[0], ls[-1]
    assert final > 1.5 * start
    half = len(ls) // 2
    assert abs(ls[half] - final) < 0.1 * (final - start)  # most of the change is in the first half
    assert np.ptp(ls[-5:]) < 0.01 * final  # settled
    assert noise[-1] < 0.5 * noise[0]
    assert np.argmin(noise) < half


# --------------------------------------------------------------------------
# RGB composite
# --------------------------------------------------------------------------


def _unit(m):
    m = np.asarray(m, dtype=float)
    return (m - m.min()) / (m.max() - m.min())


def test_rgb_channels_on_their_own_unit_range(parallel):
    rgb = rgb_composite(parallel)
    assert rgb.shape == parallel.loadings.data.shape[1:] + (3,)
    for c in range(3):
        assert rgb[..., c].min() == 0.0 and rgb[..., c].max() == 1.0
        np.testing.assert_allclose(rgb[..., c], _unit(parallel.loadings.data[c]))


def test_rgb_components_are_decomposition_indices(parallel, spectrum_image):
    rgb = rgb_composite(parallel.loadings, components=(2, 0, 1))
    np.testing.assert_allclose(rgb[..., 0], _unit(parallel.loadings.data[2]))
    original = spectrum_image.get_decomposition_loadings()
    rgb = rgb_composite(original, components=(3, 1, 2))  # positions in the stack
    np.testing.assert_allclose(rgb[..., 0], _unit(original.data[3]))


def test_rgb_of_an_array_with_nan_and_a_constant_map():
    maps = np.stack([np.arange(6.0).reshape(2, 3), np.full((2, 3), 4.0), -np.arange(6.0).reshape(2, 3)])
    maps[0, 0, 1] = np.nan
    rgb = rgb_composite(maps)
    assert rgb[0, 1, 0] == 0.0 and np.isfinite(rgb).all()
    np.testing.assert_allclose(rgb[..., 0].ravel(), [0, 0, 0.4, 0.6, 0.8, 1.0])
    assert not rgb[..., 1].any()
    np.testing.assert_allclose(rgb[..., 2].ravel(), [1.0, 0.8, 0.6, 0.4, 0.2, 0.0])


def test_plot_rgb_shows_the_composite_calibrated(parallel):
    fig = plot_rgb_composite(parallel)
    (ax,) = fig.axes
    np.testing.assert_array_equal(ax.images[0].get_array(), rgb_composite(parallel))
    x_axis = parallel.loadings.axes_manager.signal_axes[0]
    left, right, _, _ = ax.images[0].get_extent()
    assert left == pytest.approx(x_axis.offset - x_axis.scale / 2)
    assert right == pytest.approx(x_axis.axis[-1] + x_axis.scale / 2)
    assert "(nm)" in ax.get_xlabel() and "R: component 0" in ax.get_title()


@pytest.mark.parametrize("components, match", [((0, 1), "3 maps"), ((0, 1, 7), "not reconstructed")])
def test_rgb_bad_components(parallel, components, match):
    with pytest.raises(ValueError, match=match):
        rgb_composite(parallel, components=components)


def test_rgb_needs_2d_maps(line_scan):
    with pytest.raises(ValueError, match="2-D maps"):
        rgb_composite(line_scan.loadings, components=(0, 1, 1))
    with pytest.raises(ValueError, match="n_maps, ny, nx"):
        rgb_composite(np.ones((3, 4)))


# --------------------------------------------------------------------------
# Maps with uncertainty
# --------------------------------------------------------------------------


def _images(fig):
    return [ax.images[0] for ax in fig.axes if ax.images]


def test_maps_and_std_side_by_side(parallel):
    images = _images(plot_maps_with_uncertainty(parallel))
    assert len(images) == 2 * N_MAPS
    for i in range(N_MAPS):
        np.testing.assert_allclose(images[2 * i].get_array(), parallel.loadings.data[i])
        np.testing.assert_allclose(images[2 * i + 1].get_array(), np.sqrt(parallel.variance.data[i]))


def test_std_colours_span_the_scanned_area(parallel):
    images = _images(plot_maps_with_uncertainty(parallel, components=[1]))
    assert len(images) == 2
    std = np.sqrt(parallel.variance.data[1])
    inside = std[:-1, :-1]  # upsampling 2: the last row and column are extrapolated
    assert images[1].get_clim() == pytest.approx((inside.min(), inside.max()))
    assert std.max() > inside.max()


def test_maps_with_uncertainty_after_save_and_load(parallel, tmp_path):
    loaded = _saved_and_loaded(parallel.loadings, tmp_path / "loadings.hspy")
    images = _images(plot_maps_with_uncertainty(loaded, components=[2]))
    np.testing.assert_allclose(images[1].get_array(), np.sqrt(parallel.variance.data[2]))


def test_maps_with_uncertainty_of_a_line_scan(line_scan):
    fig = plot_maps_with_uncertainty(line_scan)
    assert len(fig.axes) == 4
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), np.sqrt(line_scan.variance.data[0]))


def test_maps_with_uncertainty_bad_component(parallel):
    with pytest.raises(ValueError, match="not reconstructed"):
        plot_maps_with_uncertainty(parallel, components=[5])


# --------------------------------------------------------------------------
# Spectrum with its band
# --------------------------------------------------------------------------


def _band(ax, energy):
    """Lower and upper edge of the fill_between band at each energy."""
    vertices = ax.collections[0].get_paths()[0].vertices
    lower = np.array([vertices[np.isclose(vertices[:, 0], e), 1].min() for e in energy])
    upper = np.array([vertices[np.isclose(vertices[:, 0], e), 1].max() for e in energy])
    return lower, upper


@pytest.mark.parametrize("rec_name", ["parallel", "independent"])
def test_band_is_two_sigma_from_map_variances(request, spectrum_image, rec_name):
    rec = request.getfixturevalue(rec_name)
    pixel = (5, 9)
    fig = plot_spectrum_with_band(rec, pixel)
    ax = fig.axes[0]
    energy = spectrum_image.axes_manager.signal_axes[0].axis
    factors = spectrum_image.learning_results.factors[:, :N_MAPS]
    map_var = rec.variance.data[(slice(None),) + pixel]
    sigma = np.sqrt(sum(map_var[i] * factors[:, i] ** 2 for i in range(N_MAPS)))
    mean = rec.signal.data[pixel]
    lower, upper = _band(ax, energy)
    np.testing.assert_allclose(upper - mean, 2 * sigma, rtol=1e-5)
    np.testing.assert_allclose(mean - lower, 2 * sigma, rtol=1e-5)
    gp_line = [line for line in ax.lines if line.get_label() == "GP reconstruction"][0]
    np.testing.assert_allclose(gp_line.get_ydata(), mean)
    np.testing.assert_allclose(spectrum_std(rec, pixel), sigma, rtol=1e-6)


def test_band_with_the_original_spectrum_at_the_same_place(parallel, spectrum_image):
    ax = plot_spectrum_with_band(parallel, (10, 12), original=spectrum_image).axes[0]
    (raw,) = [line for line in ax.lines if line.get_label().startswith("original")]
    assert raw.get_label() == "original at pixel (5, 6)"
    np.testing.assert_array_equal(raw.get_ydata(), spectrum_image.data[5, 6])


def test_band_after_save_and_load_and_into_given_axes(parallel, tmp_path):
    loaded = _saved_and_loaded(parallel.signal, tmp_path / "signal.hspy")
    fig, ax = plt.subplots()
    assert plot_spectrum_with_band(loaded, (3, 4), ax=ax) is fig
    np.testing.assert_allclose(spectrum_std(loaded, (3, 4)), spectrum_std(parallel, (3, 4)))


def test_band_bad_inputs(parallel):
    with pytest.raises(ValueError, match="outside the reconstructed grid"):
        plot_spectrum_with_band(parallel, (32, 0))
    with pytest.raises(TypeError, match="rec.signal"):
        plot_spectrum_with_band(parallel.loadings, (0, 0))
