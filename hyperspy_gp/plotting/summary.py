"""The reconstruction summary: loading maps, GP mean and std, and spectra in one figure.

matplotlib is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hyperspy_gp._hyperspy import navigation_shape
from hyperspy_gp.plotting._inputs import as_numpy as _as_numpy
from hyperspy_gp.plotting._inputs import check_pixel, image_extent
from hyperspy_gp.plotting._inputs import label as _axis_label
from hyperspy_gp.plotting._inputs import text as _text

__all__ = ["plot_reconstruction_summary"]

#: Colour of the GP curves and of the spectrum reconstructed by the GP.
GP_COLOUR = "tab:red"
#: Colour of the original (decomposition / raw) data.
DATA_COLOUR = "0.35"
#: Length units (in metres) that scan axes may be shown in, largest first.
LENGTH_UNITS = {"m": 1.0, "mm": 1e-3, "µm": 1e-6, "um": 1e-6, "nm": 1e-9, "Å": 1e-10, "pm": 1e-12}
#: Units a scan axis is converted to when its own make the field of view < 1 or ≥ 1000.
DISPLAY_UNITS = ("m", "mm", "µm", "nm")


def plot_reconstruction_summary(original, reconstruction, components: Sequence[int] | None = None,
                                max_components: int = 4, pixel: Sequence[int] | None = None):
    """Compare the decomposition loading maps with their GP reconstruction.

    One row per component: the original loading map, the GP mean on the
    (upsampled) grid and the GP predictive standard deviation, each with a
    colour bar; the original map and the GP mean share one colour scale.  A
    last row shows the spectrum at one scan pixel (raw vs GP reconstruction,
    the pixel is marked on the maps) and the mean spectrum over the scan.  For
    a line scan each component row is a plot of the original loading and the GP
    mean with its ±2σ band.  Scan axes are calibrated (names and units from
    the signals; lengths are shown in nm, µm, ... so that the field of view
    reads between 1 and 1000).

    Parameters
    ----------
    original : :class:`~hyperspy.api.signals.Signal1D`
        The spectrum image that was reconstructed, with its decomposition.
    reconstruction : GPReconstruction
        The result of :func:`hyperspy_gp.gp_reconstruct` for `original`.
    components : sequence of int, optional
        Decomposition component indices to show; each must have been
        reconstructed.  Default: the reconstructed ones.
    max_components : int
        Show at most this many components (the first ones).
    pixel : sequence of int, optional
        Scan pixel of the spectrum panel, in numpy order (``(row, column)``,
        or ``(index,)`` for a line scan).  Default: the centre of the scan.

    Returns
    -------
    matplotlib.figure.Figure
        A pyplot figure; close it with ``matplotlib.pyplot.close(fig)``.

    Raises
    ------
    ValueError
        If a requested component was not reconstructed, `max_components` < 1 or
        `pixel` is outside the scan.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> from hyperspy_gp import gp_reconstruct
    >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
    >>> s = atomic_eels_spectrum_image(shape=(12, 12), n_channels=32, seed=0)
    >>> s.decomposition(output_dimension=2, print_info=False)
    >>> rec = gp_reconstruct(s, components=2, upsampling=2)
    >>> fig = plot_reconstruction_summary(s, rec)
    >>> sum(1 for ax in fig.axes if ax.images)  # 2 components x 3 maps
    6
    >>> plt.close(fig)
    """
    rows = _rows(reconstruction, components, max_components)
    view = _view(original, reconstruction, pixel)
    fig, grid = _figure(len(rows), len(view.scan))
    for row, (component, index) in enumerate(rows):
        if len(view.scan) == 2:
            _map_row(fig, grid, row, view, component, index)
        else:
            _curve_row(fig, grid, row, view, component, index)
    _spectrum_row(fig, grid, len(rows), view)
    title = original.metadata.General.title or "signal"
    fig.suptitle(f"GP reconstruction of {title}: {_settings_text(reconstruction)}")
    return fig


# --------------------------------------------------------------------------
# What to plot
# --------------------------------------------------------------------------


@dataclass
class _Axis:
    """A calibrated axis as displayed."""

    name: str
    units: str
    values: np.ndarray
    scale: float

    @property
    def label(self) -> str:
        return _axis_label(self.name, self.units)


@dataclass
class _View:
    """The signals, their scan axes as displayed (numpy order) and the spectrum pixel."""

    original: object
    reconstruction: object
    scan: list[_Axis]
    gp: list[_Axis]
    pixel: tuple[int, ...]


def _rows(reconstruction, components, max_components: int) -> list[tuple[int, int]]:
    """``(component index, row of reconstruction.loadings)`` pairs to plot."""
    if max_components < 1:
        raise ValueError(f"max_components must be >= 1, not {max_components!r}.")
    done = [int(c) for c in _gp_settings(reconstruction).get_item("components")]
    wanted = done if components is None else [int(c) for c in components]
    missing = [c for c in wanted if c not in done]
    if missing:
        raise ValueError(f"components {missing} were not reconstructed; reconstructed: {done}.")
    return [(c, done.index(c)) for c in wanted[:max_components]]


def _view(original, reconstruction, pixel) -> _View:
    scan_axes = original.axes_manager.navigation_axes[::-1]
    gp_axes = reconstruction.loadings.axes_manager.signal_axes[::-1]
    scan, gp = [], []
    for axis, gp_axis in zip(scan_axes, gp_axes):
        units, factor = _readable_length(axis)
        scan.append(_display_axis(axis, units, factor))
        gp.append(_display_axis(gp_axis, units, factor))
    shape = [a.size for a in scan_axes]
    pixel = tuple(n // 2 for n in shape) if pixel is None else check_pixel(pixel, shape, "scan")
    return _View(original, reconstruction, scan, gp, pixel)


def _gp_settings(reconstruction):
    return reconstruction.loadings.metadata.GP_reconstruction.settings


def _settings_text(reconstruction) -> str:
    settings = _gp_settings(reconstruction)
    return f"{settings.mode} mode, {settings.kernel} kernel, upsampling ×{settings.upsampling}"


def _readable_length(axis) -> tuple[str, float]:
    """Units to show ``axis`` in and the factor from its own units to them."""
    units = _text(axis.units)
    if units not in LENGTH_UNITS:
        return units, 1.0
    field_of_view = abs(axis.scale) * axis.size * LENGTH_UNITS[units]
    if 1.0 <= field_of_view / LENGTH_UNITS[units] < 1000.0:
        return units, 1.0
    target = next((u for u in DISPLAY_UNITS if field_of_view >= LENGTH_UNITS[u]), DISPLAY_UNITS[-1])
    return target, LENGTH_UNITS[units] / LENGTH_UNITS[target]


def _display_axis(axis, units: str, factor: float) -> _Axis:
    return _Axis(_text(axis.name) or "axis", units, np.asarray(axis.axis) * factor, axis.scale * factor)


# --------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------


def _figure(n_rows: int, n_nav: int):
    """A pyplot figure with a grid of ``n_rows`` component rows + a spectrum row."""
    import matplotlib.pyplot as plt

    n_cols = 3 if n_nav == 2 else 2
    width, row_height = (12.0, 3.1) if n_nav == 2 else (10.0, 2.2)
    fig = plt.figure(figsize=(width, row_height * n_rows + 3.2), layout="constrained")
    ratios = [row_height] * n_rows + [3.0]
    return fig, fig.add_gridspec(n_rows + 1, n_cols, height_ratios=ratios)


# --------------------------------------------------------------------------
# Component rows
# --------------------------------------------------------------------------


def _map_row(fig, grid, row: int, view: _View, component: int, index: int) -> None:
    """Original map, GP mean and GP std of one component (2-D scan) in ``grid`` row ``row``."""
    y_axis, x_axis = view.scan
    last = row == grid.nrows - 2
    marker = (x_axis.values[view.pixel[1]], y_axis.values[view.pixel[0]])
    for col, (image, extent, title, style) in enumerate(_map_panels(view, component, index)):
        ax = fig.add_subplot(grid[row, col])
        im = ax.imshow(image, extent=extent, interpolation="nearest", **{"cmap": "viridis", **style})
        fig.colorbar(im, ax=ax, shrink=0.9, extend=_extend(image, style["vmin"], style["vmax"]))
        ax.plot(*marker, marker="+", color="white", markersize=9, markeredgewidth=1.5)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel(x_axis.label if last else "")
        ax.set_ylabel(y_axis.label if col == 0 else "")
        ax.tick_params(labelbottom=last, labelleft=col == 0)


def _map_panels(view: _View, component: int, index: int) -> list[tuple]:
    """``(image, extent, title, imshow style)`` of the original, GP mean and GP std maps."""
    data = _original_loading(view.original, component)
    mean, std = _gp_maps(view.reconstruction, index)
    vmin, vmax = _colour_limits(data, mean)
    # Upsampled grids extend (u - 1) fine pixels past the last scan pixel, where the
    # GP extrapolates and its std grows: scale the std colours to the scanned area.
    inside = std[np.ix_(*(_inside(g, a) for g, a in zip(view.gp, view.scan)))]
    gp_extent = _extent(*view.gp)
    noise = _noise_ratio(view.reconstruction, index, data)
    return [
        (data, _extent(*view.scan), f"Component {component}: original", dict(vmin=vmin, vmax=vmax)),
        (mean, gp_extent, f"GP mean, {_lengthscale_text(view, index)}", dict(vmin=vmin, vmax=vmax)),
        (std, gp_extent, f"GP std; noise σ = {noise:.0%} of map σ",
         dict(cmap="magma", vmin=float(inside.min()), vmax=float(inside.max()))),
    ]


def _curve_row(fig, grid, row: int, view: _View, component: int, index: int) -> None:
    """Original loading and GP mean ± 2σ of one component (line scan) in ``grid`` row ``row``."""
    last = row == grid.nrows - 2
    (axis,), (gp_axis,) = view.scan, view.gp
    mean, std = _gp_maps(view.reconstruction, index)
    ax = fig.add_subplot(grid[row, :])
    ax.fill_between(gp_axis.values, mean - 2 * std, mean + 2 * std, color=GP_COLOUR, alpha=0.25,
                    linewidth=0, label="GP ±2σ")
    ax.plot(axis.values, _original_loading(view.original, component), "o-", color=DATA_COLOUR,
            markersize=3, linewidth=0.8, label="original")
    ax.plot(gp_axis.values, mean, color=GP_COLOUR, linewidth=1.5, label="GP mean")
    ax.axvline(axis.values[view.pixel[0]], color="0.6", linestyle=":", linewidth=1)
    ax.set_title(f"Component {component}: loading (GP {_lengthscale_text(view, index)})", fontsize="medium")
    ax.set_ylabel("loading")
    ax.set_xlabel(axis.label if last else "")
    ax.legend(loc="upper right", fontsize="small", ncols=3)


def _original_loading(original, component: int) -> np.ndarray:
    """Loading map of ``component`` in numpy navigation order."""
    loadings = _as_numpy(original.learning_results.loadings)
    shape = navigation_shape(original)
    return loadings[:, component].reshape(shape)


def _gp_maps(reconstruction, index: int) -> tuple[np.ndarray, np.ndarray]:
    """GP mean and predictive standard deviation of loadings row ``index``."""
    mean = np.asarray(reconstruction.loadings.data[index])
    std = np.sqrt(np.clip(np.asarray(reconstruction.variance.data[index]), 0.0, None))
    return mean, std


def _colour_limits(*maps: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([m.ravel() for m in maps])
    return tuple(float(v) for v in np.percentile(values, [0.5, 99.5]))


def _extent(y_axis: _Axis, x_axis: _Axis) -> tuple[float, float, float, float]:
    return image_extent(x_axis.values, x_axis.scale, y_axis.values, y_axis.scale)


def _inside(gp_axis: _Axis, axis: _Axis) -> np.ndarray:
    """Mask of the ``gp_axis`` points within the coordinate range of ``axis``."""
    return gp_axis.values <= axis.values[-1] + 1e-6 * abs(axis.scale)


def _extend(image: np.ndarray, vmin: float, vmax: float) -> str:
    """Colour-bar ``extend`` for values outside ``[vmin, vmax]``."""
    low, high = bool(image.min() < vmin), bool(image.max() > vmax)
    if low and high:
        return "both"
    return "min" if low else "max" if high else "neither"


def _noise_ratio(reconstruction, index: int, data: np.ndarray) -> float:
    """Fitted noise standard deviation of loadings row ``index`` relative to the map's."""
    noise = float(reconstruction.hyperparameters["noise_variance"][index])
    spread = float(np.std(data))
    return np.sqrt(noise) / spread if spread > 0 else float("nan")


def _lengthscale_text(view: _View, index: int) -> str:
    """``"ℓ = 0.205 × 0.205 nm"``: the fitted length scales of loadings row ``index``."""
    pixels = np.atleast_1d(view.reconstruction.hyperparameters["lengthscale_px"][index])
    values = [px * axis.scale for px, axis in zip(pixels, view.scan)]
    units = {axis.units for axis in view.scan}
    unit = f" {units.pop()}" if len(units) == 1 else ""
    return "ℓ = " + " × ".join(f"{v:.3g}" for v in values) + unit


# --------------------------------------------------------------------------
# Spectra
# --------------------------------------------------------------------------


def _spectrum_row(fig, grid, row: int, view: _View) -> None:
    """Raw vs GP spectrum at the chosen pixel and the scan-mean spectra side by side."""
    original, signal = view.original, view.reconstruction.signal
    energy = original.axes_manager.signal_axes[0]
    ax = fig.add_subplot(grid[row, :-1])
    ax.plot(energy.axis, _as_numpy(original.data[view.pixel]), color=DATA_COLOUR, linewidth=0.7,
            label="original (raw)")
    ax.plot(energy.axis, _as_numpy(signal.data[_matching_pixel(view)]), color=GP_COLOUR, linewidth=1.3,
            label="GP reconstruction")
    where = "+ on the maps" if len(view.pixel) == 2 else "dotted line above"
    ax.set_title(f"Spectrum at {_pixel_text(view)} ({where})", fontsize="medium")
    _spectrum_axes(ax, original, energy)
    ax = fig.add_subplot(grid[row, -1])
    nav = tuple(range(original.axes_manager.navigation_dimension))
    ax.plot(energy.axis, _as_numpy(original.data.mean(axis=nav)), color=DATA_COLOUR, linewidth=1.0,
            label="original")
    ax.plot(energy.axis, _as_numpy(signal.data.mean(axis=nav)), color=GP_COLOUR, linewidth=1.0,
            linestyle="--", label="GP reconstruction")
    ax.set_title("Mean spectrum over the scan", fontsize="medium")
    _spectrum_axes(ax, original, energy)


def _spectrum_axes(ax, original, energy_axis) -> None:
    quantity = original.metadata.get_item("Signal.quantity", "Intensity")
    ax.set_xlabel(_axis_label(_text(energy_axis.name) or "signal axis", _text(energy_axis.units)))
    ax.set_ylabel(quantity)
    ax.legend(fontsize="small")


def _matching_pixel(view: _View) -> tuple[int, ...]:
    """Index of the reconstructed-grid pixel at the coordinates of the chosen pixel."""
    return tuple(int(np.argmin(np.abs(g.values - a.values[p]))) for a, g, p in zip(view.scan, view.gp, view.pixel))


def _pixel_text(view: _View) -> str:
    """``"y, x = 1.56, 1.56 nm (pixel 24, 24)"``."""
    names = ", ".join(a.name for a in view.scan)
    coords = ", ".join(f"{a.values[p]:.3g}" for a, p in zip(view.scan, view.pixel))
    index = ", ".join(str(p) for p in view.pixel)
    units = f" {view.scan[0].units}" if view.scan[0].units else ""
    return f"{names} = {coords}{units} (pixel {index})"
