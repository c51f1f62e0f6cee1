"""Spatial outlier spectra: find them with robust statistics, replace them by their neighbours.

A few bad scan positions (a cosmic ray, a detector glitch, a dead readout) can
dominate a PCA/NMF component and leak into the others, and a GP then fits them as
signal.  Two robust statistics are computed per scan pixel, each compared with its
spatial neighbourhood (the ``(2r + 1)^n - 1`` pixels within ``r`` pixels along every
navigation axis, clipped at the scan edges):

* **intensity**: the total intensity minus the median total of the neighbours;
* **shape**: the Euclidean distance ``d`` from the spectrum to the channel-wise median
  spectrum of its neighbours, divided by the median of the neighbours' own ``d``
  (a pixel on an atomic column is as far from its neighbours as they are from
  theirs; a glitch is not), on a log scale.

Each is turned into a robust z-score over the scan, ``(x - median) / (1.4826 MAD)``;
a pixel is an outlier when ``|z_intensity|`` or ``z_shape`` exceeds the threshold,
or when its spectrum is not finite.  Outliers are replaced by the mean spectrum of
the non-outlier pixels of their neighbourhood.
"""

from __future__ import annotations

import itertools
import logging
import warnings

import numpy as np

from hyperspy_gp import _hyperspy as hsglue

__all__ = ["find_spatial_outliers", "remove_spatial_outliers"]

_logger = logging.getLogger(__name__)

#: ``1 / Φ⁻¹(3/4)``: makes the MAD a consistent estimator of a normal σ.
MAD_TO_SIGMA = 1.4826
#: Metadata node of the output signal that records what was replaced.
METADATA_NODE = "Spatial_outliers"
#: Bytes of float64 data (with its neighbourhood) handled per dask task.
_TASK_BYTES = 16 * 2**20


def find_spatial_outliers(signal, threshold: float = 8.0, radius: int | None = None) -> np.ndarray:
    """Boolean map of the scan pixels whose spectra are spatial outliers.

    See the module documentation (:mod:`hyperspy_gp.outliers`) for the two robust
    statistics.  The default threshold is deliberately conservative: on Poisson-noisy
    atomic-resolution images the largest z-score of a genuine pixel is about 5-6, so
    only clearly aberrant spectra are flagged; lower it to catch subtler glitches.

    Parameters
    ----------
    signal : :class:`~hyperspy.signal.BaseSignal`
        A signal with at least one navigation axis (line scan, spectrum image, ...)
        and at least 3 scan pixels; not modified.  A lazy signal is read in
        neighbourhood chunks and only the per-pixel statistics are kept in memory.
    threshold : float
        Robust z-score above which a pixel is an outlier (> 0).
    radius : int, optional
        Neighbourhood half-width in pixels.  Default: 1 (the 8 neighbours of a pixel
        of a 2-D scan), 2 for a line scan (4 neighbours).

    Returns
    -------
    numpy.ndarray
        Boolean array of the navigation shape in numpy order (``(ny, nx)``), True at
        outliers.

    Raises
    ------
    ValueError
        If the signal has no navigation axis or fewer than 3 scan pixels, or if
        `threshold` or `radius` is not positive.

    Examples
    --------
    >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
    >>> s = atomic_eels_spectrum_image((12, 12), n_channels=32, seed=0)
    >>> s.data[3, 4] *= 10
    >>> [tuple(int(i) for i in p) for p in zip(*find_spatial_outliers(s).nonzero())]
    [(3, 4)]
    """
    radius = _check_request(signal, threshold, radius)
    z_intensity, z_shape, finite = _zscores(signal.data, signal.axes_manager.navigation_dimension, radius)
    return (np.abs(z_intensity) > threshold) | (z_shape > threshold) | ~finite


def remove_spatial_outliers(signal, threshold: float = 8.0, radius: int | None = None):
    """Replace spatial outlier spectra by the mean of their valid neighbours.

    Outliers are found by :func:`find_spatial_outliers`.  Each is replaced by the mean
    spectrum of the non-outlier pixels of its neighbourhood (the neighbourhood is
    widened, one pixel at a time, if all of them are outliers), cast to the signal's
    dtype (rounded for integer data).  All other spectra are copied unchanged.

    Parameters
    ----------
    signal : :class:`~hyperspy.signal.BaseSignal`
        A signal with at least one navigation axis; not modified.  A lazy signal gives
        a lazy result; its statistics and the neighbours of the outliers are computed.
    threshold : float
        Robust z-score above which a pixel is an outlier (> 0).
    radius : int, optional
        Neighbourhood half-width in pixels; default 1 for 2-D scans, 2 for line scans.

    Returns
    -------
    :class:`~hyperspy.signal.BaseSignal`
        A new signal of the same class, axes and metadata.  The decomposition results
        of `signal` are not copied (they describe the uncorrected data).  Its
        ``metadata.Spatial_outliers`` holds ``mask`` (boolean array of the navigation
        shape in numpy order, True where a spectrum was replaced), ``n_outliers``,
        ``threshold`` and ``radius``; it is saved with the signal.

    Raises
    ------
    ValueError
        As :func:`find_spatial_outliers`.

    Examples
    --------
    >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
    >>> s = atomic_eels_spectrum_image((12, 12), n_channels=32, seed=0)
    >>> s.data[3, 4] = 0  # a dead pixel
    >>> clean = remove_spatial_outliers(s)
    >>> int(clean.metadata.Spatial_outliers.n_outliers), bool(clean.data[3, 4].sum() > 0)
    (1, True)
    """
    radius = _check_request(signal, threshold, radius)
    mask = find_spatial_outliers(signal, threshold, radius)
    pixels = [tuple(int(i) for i in p) for p in zip(*mask.nonzero())]
    replacements = _replacements(signal.data, mask, pixels, radius)
    out = signal.deepcopy()
    hsglue.clear_learning_results(out)
    if hsglue.is_lazy(signal):
        out.data = _patched_lazy(out.data, pixels, replacements)
    else:
        for pixel, spectrum in zip(pixels, replacements):
            out.data[pixel] = spectrum
    out.metadata.set_item(
        METADATA_NODE,
        {"mask": mask, "n_outliers": len(pixels), "threshold": float(threshold), "radius": radius},
    )
    _logger.info(
        "Replaced %d spatial outlier spectra (threshold %g, radius %d) at pixels %s (numpy order).",
        len(pixels), threshold, radius, pixels,
    )
    return out


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _check_request(signal, threshold, radius) -> int:
    from hyperspy.signal import BaseSignal

    if not isinstance(signal, BaseSignal):
        raise TypeError(f"signal must be a HyperSpy signal, not {type(signal).__name__}.")
    n_nav = signal.axes_manager.navigation_dimension
    if n_nav == 0:
        raise ValueError(
            "This signal has no navigation axes (a single spectrum): spatial outliers need a "
            "line scan or a spectrum image."
        )
    if signal.axes_manager.navigation_size < 3:
        raise ValueError(
            f"The scan has {signal.axes_manager.navigation_size} pixels; finding spatial outliers "
            "needs at least 3."
        )
    if np.issubdtype(signal.data.dtype, np.complexfloating):
        raise ValueError("Spatial outliers are found on real data; this signal is complex. Use s.real or s.amplitude.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
            or not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a positive robust z-score (e.g. 8), not {threshold!r}.")
    if radius is None:
        return 2 if n_nav == 1 else 1
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 1:
        raise ValueError(f"radius must be a positive integer number of pixels, not {radius!r}.")
    return int(radius)


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def _zscores(data, n_nav: int, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Robust z-scores of intensity and shape, and the mask of finite spectra."""
    import dask
    import dask.array as da

    x = _as_dask(data, n_nav, radius)
    sig_axes = tuple(range(n_nav, x.ndim))
    depth = {i: radius for i in range(n_nav)}
    padded = da.overlap.overlap(x, depth=depth, boundary={i: np.nan for i in range(n_nav)})
    distance = padded.map_blocks(
        _block_distance, radius, n_nav, drop_axis=sig_axes, chunks=x.chunks[:n_nav], dtype=np.float64
    )
    total, finite, distance = dask.compute(x.sum(axis=sig_axes), da.isfinite(x).all(axis=sig_axes), distance)
    finite &= np.isfinite(total)
    total = np.where(finite, total, np.nan)
    distance = np.where(finite, distance, np.nan)
    z_intensity = _robust_z(total - _neighbour_median(total, n_nav, radius), finite)
    typical = _neighbour_median(distance, n_nav, radius)
    tiny = np.finfo(np.float64).tiny
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(np.maximum(distance, tiny) / np.maximum(typical, tiny))
    z_shape = _robust_z(ratio, finite & np.isfinite(ratio))
    return z_intensity, z_shape, finite


def _as_dask(data, n_nav: int, radius: int):
    """``data`` as a float64 dask array, whole along the signal axes."""
    import dask.array as da

    if isinstance(data, da.Array):
        x = data.rechunk({i: -1 for i in range(n_nav, data.ndim)})
    else:
        per_first = int(np.prod(data.shape[1:])) * 8 * (2 * radius + 1) ** n_nav
        rows = max(1, min(data.shape[0], _TASK_BYTES // max(per_first, 1)))
        x = da.from_array(data, chunks=(rows,) + (-1,) * (data.ndim - 1))
    return x.astype(np.float64)


def _offsets(n_nav: int, radius: int):
    """Neighbour offsets within ``radius`` along every axis, the centre excluded."""
    steps = range(-radius, radius + 1)
    return [o for o in itertools.product(steps, repeat=n_nav) if any(o)]


def _neighbour_median(padded_or_plain: np.ndarray, n_nav: int, radius: int, padded: bool = False) -> np.ndarray:
    """Channel-wise median over the neighbours of every pixel, ignoring NaN (scan edges).

    ``padded_or_plain`` has ``n_nav`` leading navigation axes; unless ``padded`` it is
    NaN-padded by ``radius`` here.  The result has the unpadded shape.
    """
    a = padded_or_plain
    if not padded:
        a = np.pad(a, [(radius, radius)] * n_nav + [(0, 0)] * (a.ndim - n_nav), constant_values=np.nan)
    shape = tuple(n - 2 * radius for n in a.shape[:n_nav])
    stack = np.stack([
        a[tuple(slice(radius + o, radius + o + n) for o, n in zip(offset, shape))]
        for offset in _offsets(n_nav, radius)
    ])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        return np.nanmedian(stack, axis=0)


def _block_distance(block: np.ndarray, radius: int, n_nav: int) -> np.ndarray:
    """Distance of each inner spectrum of a NaN-padded block to its neighbours' median."""
    median = _neighbour_median(block, n_nav, radius, padded=True)
    inner = block[tuple(slice(radius, n - radius) for n in block.shape[:n_nav])]
    diff = inner - median
    return np.sqrt(np.nansum(diff * diff, axis=tuple(range(n_nav, block.ndim))))


def _robust_z(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``(x - median) / (1.4826 MAD)`` over the valid pixels (0 where the scale is 0)."""
    sample = values[valid]
    if sample.size == 0:
        return np.zeros_like(values)
    centre = np.median(sample)
    spread = MAD_TO_SIGMA * np.median(np.abs(sample - centre))
    if spread == 0:  # more than half the pixels tie: fall back to the mean deviation
        spread = np.sqrt(np.pi / 2) * np.mean(np.abs(sample - centre))
    if spread == 0:
        return np.zeros_like(values)
    return np.where(valid, (values - centre) / spread, 0.0)


# --------------------------------------------------------------------------
# Replacement
# --------------------------------------------------------------------------


def _neighbours(pixel: tuple[int, ...], mask: np.ndarray, radius: int) -> list[tuple[int, ...]]:
    """Valid (non-outlier) pixels around ``pixel``, widening the window until some exist."""
    shape = mask.shape
    for r in range(radius, max(shape) + 1):
        found = []
        for offset in _offsets(len(shape), r):
            q = tuple(p + o for p, o in zip(pixel, offset))
            if all(0 <= i < n for i, n in zip(q, shape)) and not mask[q]:
                found.append(q)
        if found:
            return found
    raise ValueError("Every scan pixel is an outlier: raise the threshold.")


def _replacements(data, mask: np.ndarray, pixels: list[tuple[int, ...]], radius: int) -> list[np.ndarray]:
    """The replacement spectrum of each outlier pixel, in the data's dtype."""
    if not pixels:
        return []
    groups = [_neighbours(p, mask, radius) for p in pixels]
    wanted = sorted({q for group in groups for q in group})
    index = tuple(np.array(i) for i in zip(*wanted))
    if hasattr(data, "vindex"):
        spectra = np.asarray(data.vindex[index].compute(), dtype=np.float64)
    else:
        spectra = np.asarray(data[index], dtype=np.float64)
    row = {q: i for i, q in enumerate(wanted)}
    means = [spectra[[row[q] for q in group]].mean(axis=0) for group in groups]
    if np.issubdtype(data.dtype, np.integer):
        means = [np.rint(m) for m in means]
    return [m.astype(data.dtype) for m in means]


def _patched_lazy(data, pixels: list[tuple[int, ...]], replacements: list[np.ndarray]):
    """A dask array equal to ``data`` except at ``pixels``."""
    if not pixels:
        return data
    n_nav = len(pixels[0])

    def patch(block, block_info=None):
        starts = [lo for lo, _ in block_info[0]["array-location"][:n_nav]]
        stops = [hi for _, hi in block_info[0]["array-location"][:n_nav]]
        inside = [(p, r) for p, r in zip(pixels, replacements)
                  if all(lo <= i < hi for i, lo, hi in zip(p, starts, stops))]
        if not inside:
            return block
        block = block.copy()
        for p, r in inside:
            local = tuple(i - lo for i, lo in zip(p, starts))
            block[local] = _block_slice(r, block_info[0]["array-location"][n_nav:])
        return block

    return data.map_blocks(patch, dtype=data.dtype)


def _block_slice(spectrum: np.ndarray, locations) -> np.ndarray:
    """The part of ``spectrum`` in a block spanning ``locations`` along the signal axes."""
    return spectrum[tuple(slice(lo, hi) for lo, hi in locations)]
