"""The reconstructed spectrum at one pixel with its uncertainty band."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hyperspy_gp.plotting._inputs import (
    GP_NODE,
    as_numpy,
    axis_label,
    check_pixel,
    gp_metadata,
    is_reconstruction,
    text,
)

__all__ = ["spectrum_std", "plot_spectrum_with_band"]


def spectrum_std(rec, pixel: Sequence[int]) -> np.ndarray:
    """Standard deviation of the reconstructed spectrum at one pixel, per channel.

    ``σ²(E) = Σ_i var_i(pixel) · w_i(E)²`` with ``var_i`` the GP predictive variance of
    map ``i`` and ``w_i`` its spectral factor.  This treats the maps as independent
    a posteriori: exact for ``mode="independent"``, an approximation for the parallel
    GP, whose maps are correlated (their covariances are not kept).  It is the
    uncertainty of the denoised spectrum due to the maps alone: the factors are taken
    as exact and it is not the spread of a new noisy measurement.

    Parameters
    ----------
    rec : GPReconstruction or signal
        The result of :func:`hyperspy_gp.gp_reconstruct` or its ``signal`` (also after
        saving and loading).
    pixel : sequence of int
        Pixel of the reconstructed (upsampled) grid, numpy order (``(row, column)``).

    Returns
    -------
    numpy.ndarray
        ``σ(E)``, one value per channel.

    Examples
    --------
    >>> from hyperspy_gp import gp_reconstruct
    >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
    >>> s = atomic_eels_spectrum_image(shape=(12, 12), n_channels=32, seed=0)
    >>> s.decomposition(output_dimension=2, print_info=False)
    >>> rec = gp_reconstruct(s, components=2, mode="independent")
    >>> sigma = spectrum_std(rec, (6, 6))
    >>> sigma.shape, bool((sigma > 0).all())
    ((32,), True)
    """
    signal = _signal(rec)
    pixel = check_pixel(pixel, _grid_shape(signal), "reconstructed grid")
    factors = as_numpy(signal.learning_results.factors)
    variance = np.asarray(signal.metadata.get_item(f"{GP_NODE}.loadings_variance"))
    map_variance = np.clip(variance[(slice(None),) + pixel], 0.0, None)
    return np.sqrt(factors**2 @ map_variance)


def plot_spectrum_with_band(rec, pixel: Sequence[int] | None = None, original=None, ax=None):
    """Plot the reconstructed spectrum at one pixel with its ±2σ band.

    The band is ``mean ± 2σ(E)`` with ``σ`` from :func:`spectrum_std` (maps treated
    as independent; see there).

    Parameters
    ----------
    rec : GPReconstruction or signal
        The result of :func:`hyperspy_gp.gp_reconstruct` or its ``signal`` (also after
        saving and loading).
    pixel : sequence of int, optional
        Pixel of the reconstructed (upsampled) grid, numpy order; default the centre.
    original : signal, optional
        The spectrum image that was reconstructed; its spectrum at the scan pixel
        nearest to `pixel` (same calibrated coordinates) is drawn for comparison.
    ax : matplotlib.axes.Axes, optional
        Draw into these axes instead of a new figure.

    Returns
    -------
    matplotlib.figure.Figure
        The figure holding the plot; close it with ``plt.close(fig)``.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> from hyperspy_gp import gp_reconstruct
    >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
    >>> s = atomic_eels_spectrum_image(shape=(12, 12), n_channels=32, seed=0)
    >>> s.decomposition(output_dimension=2, print_info=False)
    >>> rec = gp_reconstruct(s, components=2, upsampling=2)
    >>> fig = plot_spectrum_with_band(rec, (10, 12), original=s)
    >>> [line.get_label() for line in fig.axes[0].lines]
    ['original at pixel (5, 6)', 'GP reconstruction']
    >>> plt.close(fig)
    """
    import matplotlib.pyplot as plt

    signal = _signal(rec)
    nav = signal.axes_manager.navigation_axes[::-1]
    pixel = tuple(n.size // 2 for n in nav) if pixel is None else check_pixel(pixel, _grid_shape(signal),
                                                                            "reconstructed grid")
    sigma = spectrum_std(signal, pixel)
    mean = as_numpy(signal.data[pixel]).astype(np.float64)
    energy = signal.axes_manager.signal_axes[0]
    if ax is None:
        _, ax = plt.subplots(figsize=(8.0, 4.0), layout="constrained")
    if original is not None:
        near = tuple(int(np.argmin(np.abs(o.axis - a.axis[p])))
                     for o, a, p in zip(original.axes_manager.navigation_axes[::-1], nav, pixel))
        ax.plot(energy.axis, as_numpy(original.data[near]), color="0.45", linewidth=0.7,
                label=f"original at pixel {near}")
    ax.fill_between(energy.axis, mean - 2 * sigma, mean + 2 * sigma, color="tab:red", alpha=0.3,
                    linewidth=0, label="±2σ (map uncertainty)")
    ax.plot(energy.axis, mean, color="tab:red", linewidth=1.2, label="GP reconstruction")
    ax.set_xlabel(axis_label(energy))
    ax.set_ylabel(text(signal.metadata.get_item("Signal.quantity", "")) or "intensity")
    ax.set_title(f"Reconstructed spectrum at pixel {pixel} ({_coordinates(nav, pixel)})", fontsize="medium")
    ax.legend(fontsize="small")
    return ax.figure


def _signal(rec):
    signal = rec.signal if is_reconstruction(rec) else rec
    gp_metadata(signal, "plot_spectrum_with_band")
    if not signal.metadata.has_item(f"{GP_NODE}.loadings_variance"):
        raise TypeError(
            "The spectrum band needs the reconstructed spectrum image (rec.signal), "
            "whose metadata holds the map variances; this looks like rec.loadings."
        )
    return signal


def _grid_shape(signal) -> tuple[int, ...]:
    return tuple(a.size for a in signal.axes_manager.navigation_axes[::-1])


def _coordinates(nav, pixel) -> str:
    return ", ".join(f"{text(a.name) or 'axis'} = {a.axis[p]:.3g} {text(a.units)}".rstrip()
                     for a, p in zip(nav, pixel))
