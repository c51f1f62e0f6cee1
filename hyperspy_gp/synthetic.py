"""Synthetic data with known ground truth for testing GP reconstructions.

Everything here is pure numpy (HyperSpy/exSpy and dask are imported only where a
signal is built); torch is never imported.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "atomic_lattice_maps",
    "atomic_eels_spectrum_image",
    "similarity_maps",
    "add_noise",
    "normalized_cross_correlation",
]

#: Pseudo-cubic perovskite lattice parameter (nm) used to calibrate the pixel size.
LATTICE_PARAMETER_NM = 0.39
#: Element (edge) associated with each map of :func:`atomic_lattice_maps`.
EDGE_OF_MAP = {"A": "Mn_L23", "B": "Ti_L23", "O": "O_K"}


def _columns(yy: np.ndarray, xx: np.ndarray, y0: float, x0: float,
             spacing: float, sigma: float) -> np.ndarray:
    """Gaussian columns on a square lattice of period `spacing` through (y0, x0)."""
    dy = (yy - y0 + spacing / 2) % spacing - spacing / 2
    dx = (xx - x0 + spacing / 2) % spacing - spacing / 2
    return np.exp(-(dy**2 + dx**2) / (2 * sigma**2))


def atomic_lattice_maps(shape: tuple[int, int] = (48, 48), spacing: float = 6.0,
                        column_sigma: float = 1.2,
                        modulation_period: float | None = None,
                        seed: int | None = None) -> dict[str, np.ndarray]:
    """Noiseless concentration maps of an ABO3 perovskite seen down [001].

    "A" columns sit on the lattice points, "B" (B-O) columns at the cell
    centres and the "O" map holds the pure-O columns at the edge midpoints plus
    the O in the B-O columns. The B map is multiplied by a smooth cosine
    modulation (values 0.5..1) along the image diagonal, giving a long-range
    length scale on top of the atomic one (``column_sigma``, ``spacing``).

    Parameters
    ----------
    shape : (ny, nx)
        Map size in pixels.
    spacing : float
        Lattice period in pixels.
    column_sigma : float
        Gaussian standard deviation of an atomic column in pixels.
    modulation_period : float, optional
        Period (pixels) of the B modulation; default twice the image width.
    seed : int, optional
        If given, randomises the sub-cell lattice origin and the modulation
        phase; ``None`` gives the canonical lattice (columns on pixel centres
        when `spacing` is an even integer, zero phase).

    Returns
    -------
    dict of str to ndarray
        ``"A"``, ``"B"``, ``"O"`` with values in [0, 1] and ``"thickness"``, a
        linear gradient from 0.8 (top) to 1.2 (bottom) that scales the signal.

    Examples
    --------
    >>> maps = atomic_lattice_maps((16, 16), spacing=4.0)
    >>> sorted(maps), maps["A"].shape
    (['A', 'B', 'O', 'thickness'], (16, 16))
    >>> bool(maps["B"].max() <= 1.0)
    True
    """
    ny, nx = shape
    if seed is None:
        origin, phase = np.full(2, np.floor(spacing / 4)), 0.0
    else:
        rng = np.random.default_rng(seed)
        origin, phase = rng.uniform(0, spacing, 2), rng.uniform(0, 2 * np.pi)
    period = 2.0 * nx if modulation_period is None else modulation_period
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    y0, x0 = origin
    h = spacing / 2
    a = _columns(yy, xx, y0, x0, spacing, column_sigma)
    b = _columns(yy, xx, y0 + h, x0 + h, spacing, column_sigma)
    o = b + _columns(yy, xx, y0, x0 + h, spacing, column_sigma) \
        + _columns(yy, xx, y0 + h, x0, spacing, column_sigma)
    diag = (xx + yy) / np.sqrt(2)
    modulation = 0.75 + 0.25 * np.cos(2 * np.pi * diag / period + phase)
    thickness = np.repeat(np.linspace(0.8, 1.2, ny)[:, None], nx, axis=1)
    return {"A": a, "B": b * modulation, "O": np.clip(o, 0.0, 1.0),
            "thickness": thickness}


def _step(energy: np.ndarray, onset: float, height: float,
          width: float = 1.0, decay: float = 2.0) -> np.ndarray:
    """Smoothed ionisation-edge step with a power-law post-edge decay."""
    rise = 1.0 / (1.0 + np.exp(-(energy - onset) / width))
    return height * rise * (onset / np.maximum(energy, onset)) ** decay


def _peak(energy: np.ndarray, centre: float, height: float,
          width: float) -> np.ndarray:
    """Lorentzian near-edge / white-line peak."""
    return height / (1.0 + ((energy - centre) / width) ** 2)


def _edge_shapes(energy: np.ndarray) -> dict[str, np.ndarray]:
    """Ti L2,3, O K and Mn L2,3 edges in units of the background at the offset."""
    e = energy
    ti = (_step(e, 456, 0.20) + _step(e, 462, 0.10) + _peak(e, 457.5, 0.45, 1.0)
          + _peak(e, 460.0, 0.35, 1.2) + _peak(e, 463.5, 0.30, 1.2)
          + _peak(e, 465.5, 0.30, 1.5))
    o = _step(e, 532, 0.15, 2.0, 1.5) + _peak(e, 535, 0.20, 1.5) \
        + _peak(e, 542, 0.12, 4.0)
    mn = _step(e, 640, 0.08) + _step(e, 651, 0.04) + _peak(e, 642, 0.35, 1.5) \
        + _peak(e, 653, 0.18, 1.8)
    return {"Ti_L23": ti, "O_K": o, "Mn_L23": mn}


def _render_rows(maps: dict[str, np.ndarray], edges: dict[str, np.ndarray],
                 background: np.ndarray, dose: float,
                 row_seeds: Sequence[np.random.SeedSequence]) -> np.ndarray:
    """Poisson-sampled spectra (float32) of the map rows it is given.

    Row ``i`` is drawn from its own seed ``row_seeds[i]``, so the data do not depend
    on how the rows are grouped into chunks, and only one row of noiseless spectra
    exists at a time.
    """
    ny, nx = maps["A"].shape
    out = np.empty((ny, nx, background.size), dtype=np.float32)
    for i, row_seed in enumerate(row_seeds):
        mean = np.broadcast_to(background, (nx, background.size)).copy()
        for name, edge in EDGE_OF_MAP.items():
            mean += maps[name][i, :, None] * edges[edge]
        mean *= dose * maps["thickness"][i, :, None]
        out[i] = np.random.default_rng(row_seed).poisson(mean)
    return out


def _lazy_cube(maps: dict[str, np.ndarray], edges: dict[str, np.ndarray],
               background: np.ndarray, dose: float,
               row_seeds: Sequence[np.random.SeedSequence], chunk_rows: int):
    """Dask array of row chunks, one task each, equal to :func:`_render_rows`."""
    import dask
    import dask.array as da

    ny, nx = maps["A"].shape
    blocks = []
    for r0 in range(0, ny, chunk_rows):
        rows = slice(r0, r0 + chunk_rows)
        sub = {k: v[rows] for k, v in maps.items()}
        task = dask.delayed(_render_rows, pure=True)(sub, edges, background, dose, row_seeds[rows])
        blocks.append(da.from_delayed(task, (sub["A"].shape[0], nx, background.size), np.float32))
    return da.concatenate(blocks, axis=0)


def _make_signal(data, signal_type: str, lazy: bool):
    """EELSSpectrum for "EELS", otherwise a Signal1D given `signal_type`."""
    import hyperspy.api as hs

    if signal_type == "EELS":
        import exspy

        cls = exspy.signals.LazyEELSSpectrum if lazy else exspy.signals.EELSSpectrum
        return cls(data)
    s = (hs.signals.LazySignal1D if lazy else hs.signals.Signal1D)(data)
    s.set_signal_type(signal_type)
    return s


def _calibrate(s, spacing: float, energy_offset: float, energy_scale: float) -> None:
    """Set axes (y, x in nm; energy loss in eV) and acquisition metadata."""
    for ax, name in zip(s.axes_manager.navigation_axes[::-1], ("y", "x")):
        ax.name, ax.units, ax.scale = name, "nm", LATTICE_PARAMETER_NM / spacing
    e = s.axes_manager.signal_axes[0]
    e.name, e.units = "Energy loss", "eV"
    e.offset, e.scale = energy_offset, energy_scale
    s.metadata.General.title = "Synthetic atomic-resolution EELS"
    s.metadata.set_item("Signal.quantity", "Electrons (Counts)")
    s.metadata.set_item("Sample.elements", ["Mn", "O", "Ti"])
    params = {"beam_energy": 200.0, "convergence_angle": 20.0, "collection_angle": 50.0}
    if hasattr(s, "set_microscope_parameters"):
        s.set_microscope_parameters(**params, display=False)
    else:
        tem = "Acquisition_instrument.TEM."
        s.metadata.set_item(tem + "beam_energy", params["beam_energy"])
        s.metadata.set_item(tem + "convergence_angle", params["convergence_angle"])
        s.metadata.set_item(tem + "Detector.EELS.collection_angle",
                            params["collection_angle"])


def atomic_eels_spectrum_image(
    shape: tuple[int, int] = (48, 48), n_channels: int = 300,
    energy_offset: float = 400.0, energy_scale: float = 1.0, dose: float = 200.0,
    spacing: float = 6.0, seed: int | None = 0, signal_type: str = "EELS",
    lazy: bool = False, return_truth: bool = False, chunk_rows: int | None = None,
):
    """Poisson-noisy atomic-resolution EELS spectrum image of a perovskite.

    The mean spectrum at pixel (y, x) is ``dose * thickness * (b(E) +
    sum_m map_m(y, x) * edge_m(E))`` with ``b(E) = (E / energy_offset)**-3``
    and the maps of :func:`atomic_lattice_maps`. The (notional, MnTiO3-like)
    assignment is A -> Mn L2,3 (640/651 eV white lines), B -> Ti L2,3 (delayed
    onsets at 456/462 eV with split white lines) and O -> O K (532 eV step and
    near-edge peaks); physical accuracy is secondary to distinct edge shapes.

    Parameters
    ----------
    shape : (ny, nx)
        Navigation size in pixels; the pixel size is 0.39 nm / `spacing`.
    n_channels, energy_offset, energy_scale
        Energy-loss axis: `n_channels` channels from `energy_offset` eV.
    dose : float
        Counts per channel of the background at `energy_offset` (unit thickness).
    spacing : float
        Lattice period in pixels.
    seed : int, optional
        Seed of the noise; the same seed gives the same data.
    signal_type : str
        ``"EELS"`` gives an exSpy ``EELSSpectrum``; anything else a
        ``Signal1D`` converted with ``set_signal_type``.
    lazy : bool
        Build a dask array chunked over navigation rows, one task per chunk, for
        spectrum images larger than memory. Each row's noise comes from its own
        seed derived from `seed`, so lazy and eager data are identical.
    return_truth : bool
        Also return the noiseless ground truth.
    chunk_rows : int, optional
        Rows per lazy chunk; default keeps chunks around 16 MB (float32).

    Returns
    -------
    signal or (signal, truth)
        float32 Poisson counts. ``truth`` has ``"maps"`` (name -> 2-D array,
        including ``"thickness"``), ``"edges"`` (name -> 1-D array, keyed by the
        map name) and ``"background"`` (1-D array), all before scaling by `dose`.

    Examples
    --------
    >>> s = atomic_eels_spectrum_image((16, 16), n_channels=64, energy_offset=440.0)
    >>> s.data.shape, s.data.dtype
    ((16, 16, 64), dtype('float32'))
    >>> s.axes_manager.signal_axes[0].units
    'eV'
    """
    energy = energy_offset + energy_scale * np.arange(n_channels)
    background = (energy / energy_offset) ** -3.0
    all_edges = _edge_shapes(energy)
    edges = {name: all_edges[edge] for name, edge in EDGE_OF_MAP.items()}
    maps = atomic_lattice_maps(shape, spacing=spacing)
    row_seeds = np.random.SeedSequence(seed).spawn(shape[0])
    if lazy:
        rows = chunk_rows or max(1, (1 << 22) // (shape[1] * n_channels))
        data = _lazy_cube(maps, all_edges, background, dose, row_seeds, rows)
    else:
        data = _render_rows(maps, all_edges, background, dose, row_seeds)
    s = _make_signal(data, signal_type, lazy)
    _calibrate(s, spacing, energy_offset, energy_scale)
    if not return_truth:
        return s
    return s, {"maps": maps, "edges": edges, "background": background}


def similarity_maps(shape: tuple[int, int] = (48, 48),
                    period: tuple[float, float] = (8.0, 8.0)) -> np.ndarray:
    """Three ground-truth maps built from products of sines.

    Map 1 is ``(sin(2 pi x / px) sin(2 pi y / py) + 1) / 2``, map 3 equals
    map 1 and map 2 has the x period doubled; each is rescaled to [0, 1].

    Parameters
    ----------
    shape : (ny, nx)
        Map size in pixels.
    period : (py, px)
        Periods in pixels along y and x.

    Returns
    -------
    ndarray
        Shape ``(3, ny, nx)``.

    Examples
    --------
    >>> m = similarity_maps((16, 16))
    >>> m.shape, bool((m[0] == m[2]).all()), float(m.min()), float(m.max())
    ((3, 16, 16), True, 0.0, 1.0)
    """
    py, px = period
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    out = []
    for pxi in (px, 2 * px, px):
        m = (np.sin(2 * np.pi * xx / pxi) * np.sin(2 * np.pi * yy / py) + 1) / 2
        span = m.max() - m.min()
        out.append((m - m.min()) / span if span > 0 else np.zeros_like(m))
    return np.stack(out)


def add_noise(maps: np.ndarray, sigma: float | Sequence[float],
              seed: int | None = None) -> np.ndarray:
    """Return `maps` plus Gaussian noise of standard deviation `sigma` per map.

    Parameters
    ----------
    maps : ndarray
        Shape ``(n_maps, ...)``; not modified.
    sigma : float or sequence of float
        One standard deviation for all maps or one per map.
    seed : int, optional
        Seed of the noise.

    Returns
    -------
    ndarray
        A new float array shaped like `maps`.

    Examples
    --------
    >>> noisy = add_noise(similarity_maps((8, 8)), [0.1, 0.2, 0.3], seed=1)
    >>> noisy.shape
    (3, 8, 8)
    """
    maps = np.asarray(maps, dtype=float)
    sig = np.broadcast_to(np.asarray(sigma, dtype=float), (maps.shape[0],))
    sig = sig.reshape((-1,) + (1,) * (maps.ndim - 1))
    return maps + np.random.default_rng(seed).normal(size=maps.shape) * sig


def normalized_cross_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two same-shape arrays, ignoring NaN pairs.

    Both arrays are made zero-mean and unit-norm over the pixels where both are
    finite; the result is their dot product (NaN if either is constant).

    Parameters
    ----------
    a, b : ndarray
        Arrays of the same shape, e.g. a reconstructed map and its ground truth.

    Returns
    -------
    float
        The correlation coefficient in [-1, 1].

    Raises
    ------
    ValueError
        If the shapes differ.

    Examples
    --------
    >>> m = similarity_maps((16, 16))[0]
    >>> ncc = normalized_cross_correlation
    >>> round(ncc(m, m), 6), round(ncc(m, -m), 6)
    (1.0, -1.0)
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    a0, b0 = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    norm = np.sqrt((a0 @ a0) * (b0 @ b0))
    return float(a0 @ b0 / norm) if norm > 0 else float("nan")
