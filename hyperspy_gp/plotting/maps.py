"""Loading maps as pictures: RGB composites and maps next to their uncertainty."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hyperspy_gp.plotting._inputs import (
    GP_NODE,
    as_numpy,
    axis_label,
    choose_rows,
    image_extent,
    gp_metadata,
    is_reconstruction,
    reconstructed_components,
)

__all__ = ["rgb_composite", "plot_rgb_composite", "plot_maps_with_uncertainty"]


# --------------------------------------------------------------------------
# RGB composite
# --------------------------------------------------------------------------


def rgb_composite(maps, components: Sequence[int] = (0, 1, 2)) -> np.ndarray:
    """Stack three maps as the red, green and blue channels of one image.

    Each channel is scaled to its own [0, 1] range (its minimum → 0, its maximum → 1),
    so the colours show where each map is high relative to itself, not which map is
    larger.  Non-finite values (missing pixels) are drawn black; a constant map gives
    a black channel.

    Parameters
    ----------
    maps : GPReconstruction, signal or array
        A stack of 2-D maps: a reconstruction (its GP loadings are used), a loadings
        signal ``(component | y, x)`` such as ``rec.loadings`` or
        ``s.get_decomposition_loadings()``, or an array ``(n_maps, ny, nx)``.
    components : sequence of 3 int
        The maps for red, green and blue: decomposition component indices for a
        reconstruction or its loadings (whatever components were reconstructed),
        otherwise positions in the stack.

    Returns
    -------
    numpy.ndarray
        ``(ny, nx, 3)`` float64 in [0, 1].

    Raises
    ------
    ValueError
        If `components` does not hold 3 available maps or the maps are not 2-D.

    Examples
    --------
    >>> import numpy as np
    >>> maps = np.stack([np.arange(12.0).reshape(3, 4), np.ones((3, 4)), -np.arange(12.0).reshape(3, 4)])
    >>> rgb = rgb_composite(maps)
    >>> rgb.shape, float(rgb[..., 0].min()), float(rgb[..., 0].max()), float(rgb[0, 0, 2])
    ((3, 4, 3), 0.0, 1.0, 1.0)
    """
    stack, _ = _stack(maps, components, "rgb_composite")
    return np.stack([_unit_range(channel) for channel in stack], axis=-1)


def plot_rgb_composite(maps, components: Sequence[int] = (0, 1, 2)):
    """Show three maps as one RGB image (see :func:`rgb_composite`).

    Parameters
    ----------
    maps : GPReconstruction, signal or array
        As in :func:`rgb_composite`; a signal's axes calibrate the image.
    components : sequence of 3 int
        The maps for red, green and blue, as in :func:`rgb_composite`.

    Returns
    -------
    matplotlib.figure.Figure
        One axes holding the RGB image; close it with ``plt.close(fig)``.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> from hyperspy_gp.synthetic import atomic_lattice_maps
    >>> m = atomic_lattice_maps((16, 16), spacing=4.0)
    >>> fig = plot_rgb_composite(np.stack([m["A"], m["B"], m["O"]]))
    >>> fig.axes[0].images[0].get_array().shape
    (16, 16, 3)
    >>> plt.close(fig)
    """
    import matplotlib.pyplot as plt

    stack, names = _stack(maps, components, "plot_rgb_composite")
    rgb = np.stack([_unit_range(channel) for channel in stack], axis=-1)
    signal = _loadings_signal(maps)
    fig, ax = plt.subplots(figsize=(5.5, 5.5), layout="constrained")
    if signal is not None:
        x_axis, y_axis = signal.axes_manager.signal_axes
        ax.imshow(rgb, extent=image_extent(x_axis.axis, x_axis.scale, y_axis.axis, y_axis.scale),
                  interpolation="nearest")
        ax.set_xlabel(axis_label(x_axis))
        ax.set_ylabel(axis_label(y_axis))
    else:
        ax.imshow(rgb, interpolation="nearest")
        ax.set_xlabel("x (pixels)")
        ax.set_ylabel("y (pixels)")
    ax.set_title("  ".join(f"{c}: {n}" for c, n in zip(("R", "G", "B"), names))
                 + "\n(each channel scaled to its own [0, 1])", fontsize="medium")
    return fig


def _loadings_signal(maps):
    if is_reconstruction(maps):
        return maps.loadings
    return maps if hasattr(maps, "axes_manager") else None


def _stack(maps, components, what: str) -> tuple[np.ndarray, list[str]]:
    """The three chosen maps ``(3, ny, nx)`` and their names."""
    components = [int(c) for c in components]
    if len(components) != 3:
        raise ValueError(f"{what}: components must name 3 maps (red, green, blue), not {components}.")
    signal = _loadings_signal(maps)
    if signal is not None:
        if signal.axes_manager.signal_dimension != 2 or signal.axes_manager.navigation_dimension != 1:
            raise ValueError(
                f"{what} needs a stack of 2-D maps (component | y, x); got a signal with dimensions "
                f"{signal.axes_manager.navigation_shape}|{signal.axes_manager.signal_shape}."
            )
        data = as_numpy(signal.data)
        if signal.metadata.has_item(GP_NODE):
            rows = [row for _, row in choose_rows(reconstructed_components(signal, what), components, what)]
        else:
            rows = _positions(components, data.shape[0], what)
        names = [f"component {c}" for c in components]
    else:
        data = np.asarray(maps, dtype=np.float64)
        if data.ndim != 3:
            raise ValueError(f"{what} needs maps shaped (n_maps, ny, nx), got an array of shape {data.shape}.")
        rows = _positions(components, data.shape[0], what)
        names = [f"map {c}" for c in components]
    return np.asarray(data[rows], dtype=np.float64), names


def _positions(components: list[int], n_maps: int, what: str) -> list[int]:
    bad = [c for c in components if not 0 <= c < n_maps]
    if bad:
        raise ValueError(f"{what}: components {bad} are out of range for a stack of {n_maps} maps.")
    return components


def _unit_range(channel: np.ndarray) -> np.ndarray:
    """``channel`` scaled to [0, 1] over its finite values; non-finite → 0."""
    finite = np.isfinite(channel)
    if not finite.any():
        return np.zeros_like(channel)
    lo, hi = channel[finite].min(), channel[finite].max()
    scaled = (channel - lo) / (hi - lo) if hi > lo else np.zeros_like(channel)
    return np.where(finite, scaled, 0.0)


# --------------------------------------------------------------------------
# Maps and uncertainty
# --------------------------------------------------------------------------


def plot_maps_with_uncertainty(rec, components: Sequence[int] | None = None):
    """Show each GP loading map next to its predictive standard deviation.

    One row per component: the GP mean map (viridis) and the GP predictive standard
    deviation (magma), each with its own colour bar, drawn with
    :func:`hyperspy.api.plot.plot_images` (calibrated axes).  The std colours span
    the scanned area: on an upsampled grid, the last ``upsampling - 1`` rows and
    columns lie past the last scan pixel, where the GP extrapolates and its std
    grows (drawn in the top colour).  For a line scan each row
    is a pair of curves (mean, std) against the scan coordinate.

    Parameters
    ----------
    rec : GPReconstruction or signal
        The result of :func:`hyperspy_gp.gp_reconstruct`, or its ``loadings`` (also
        after saving and loading: the variance is in
        ``metadata.Signal.Noise_properties.variance``).
    components : sequence of int, optional
        Decomposition component indices to show; default all that were reconstructed.

    Returns
    -------
    matplotlib.figure.Figure
        Close it with ``plt.close(fig)``.

    Raises
    ------
    TypeError, ValueError
        If `rec` carries no GP reconstruction or a component was not reconstructed.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> from hyperspy_gp import gp_reconstruct
    >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
    >>> s = atomic_eels_spectrum_image(shape=(12, 12), n_channels=32, seed=0)
    >>> s.decomposition(output_dimension=2, print_info=False)
    >>> rec = gp_reconstruct(s, components=2, upsampling=2)
    >>> fig = plot_maps_with_uncertainty(rec)
    >>> sum(1 for ax in fig.axes if ax.images)  # 2 components x (mean, std)
    4
    >>> plt.close(fig)
    """
    loadings = rec.loadings if is_reconstruction(rec) else rec
    gp_metadata(loadings, "plot_maps_with_uncertainty")
    variance = loadings.metadata.get_item("Signal.Noise_properties.variance")
    if variance is None:
        raise TypeError("plot_maps_with_uncertainty: these loadings carry no variance "
                        "(metadata.Signal.Noise_properties.variance).")
    done = reconstructed_components(loadings, "plot_maps_with_uncertainty")
    rows = choose_rows(done, components, "plot_maps_with_uncertainty")
    pairs = [_mean_and_std(loadings, variance, c, row) for c, row in rows]
    if loadings.axes_manager.signal_dimension == 2:
        upsampling = int(gp_metadata(loadings, "plot_maps_with_uncertainty").settings.upsampling)
        return _image_pairs(pairs, upsampling)
    return _curve_pairs(pairs)


def _mean_and_std(loadings, variance, component: int, row: int):
    mean = loadings.inav[row].deepcopy()
    std = variance.inav[row].deepcopy()
    std.data = np.sqrt(np.clip(as_numpy(std.data), 0.0, None))
    mean.metadata.General.title = f"Component {component}: GP mean"
    std.metadata.General.title = f"Component {component}: GP std"
    return mean, std


def _image_pairs(pairs, upsampling: int):
    import hyperspy.api as hs
    import matplotlib.pyplot as plt

    images = [image for pair in pairs for image in pair]
    # An upsampled grid extends (u - 1) fine pixels past the last scan pixel, where the
    # GP extrapolates and its std grows: scale the std colours to the scanned area.
    scanned = tuple(slice(0, n - (upsampling - 1)) for n in pairs[0][1].data.shape)
    limits = [(None, None) if i % 2 == 0 else (float(im.data[scanned].min()), float(im.data[scanned].max()))
              for i, im in enumerate(images)]
    fig = plt.figure(figsize=(9.0, 3.8 * len(pairs)))
    axes = hs.plot.plot_images(
        images, cmap=["viridis", "magma"], per_row=2, colorbar="multi", label="titles",
        axes_decor="all", fig=fig, tight_layout=True,
        vmin=[lo for lo, _ in limits], vmax=[hi for _, hi in limits],
    )
    return axes[0].figure


def _curve_pairs(pairs):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pairs), 2, figsize=(10.0, 2.4 * len(pairs)), squeeze=False,
                             layout="constrained")
    for (mean, std), row in zip(pairs, axes):
        axis = mean.axes_manager.signal_axes[0]
        for ax, sig, colour in zip(row, (mean, std), ("tab:blue", "tab:purple")):
            ax.plot(axis.axis, as_numpy(sig.data), color=colour)
            ax.set_title(sig.metadata.General.title, fontsize="medium")
            ax.set_xlabel(axis_label(axis))
        row[0].set_ylabel("loading")
        row[1].set_ylabel("loading std")
    return fig
