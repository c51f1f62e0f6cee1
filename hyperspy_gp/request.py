"""The checked request of a GP reconstruction.

Everything :func:`hyperspy_gp.gp_reconstruct` (and the length-scale scan) is asked is
validated here, before any expensive work: the signal's shape and axes, the options,
the chosen components and their loading maps, and which exact solver can serve them.
Every error names the parameter and says what to do.  Nothing here imports torch at
module level.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from hyperspy_gp import _hyperspy as hsglue

MODES = ("parallel", "independent")
SOLVERS = ("auto", "kronecker", "dense", "iterative")
#: ``components=None`` takes every component only up to this many.
MAX_DEFAULT_COMPONENTS = 10
#: Largest grid (pixels) on which the non-separable kernel is diagonalised densely;
#: beyond it ``solver="auto"`` takes the iterative path (:mod:`~hyperspy_gp.gp.iterative`).
MAX_DENSE_PIXELS = 4096


@dataclass
class Request:
    """Validated options of one reconstruction (see :func:`hyperspy_gp.gp_reconstruct`).

    Attributes
    ----------
    components
        Chosen component indices.
    mode, upsampling, lengthscale_bounds, kernel, rank, solver, device, dtype, chunks
        As the parameters of :func:`hyperspy_gp.gp_reconstruct`, normalised
        (``lengthscale_bounds`` is ``None``, ``"auto"`` or a pair of floats or ``None``).
    observed
        Boolean grid of the measured pixels inside :attr:`crop`, for the solvers of
        missing pixels; ``None`` when the fitted grid is complete (set by
        :func:`choose_solver`).
    crop
        Slices of the scan grid that bound its measured pixels, when missing pixels
        fill whole edge rows or columns: the GP is fitted on that box, which is exact
        (unmeasured pixels carry no data) and keeps its grid structure, and predicts
        on the whole scan.  ``None`` when the box is the whole scan.
    n_missing
        Scan pixels without finite loadings, inside the box or not.
    lengthscale_scan
        The :class:`~hyperspy_gp.lengthscale_scan.LengthscaleScan` behind
        ``lengthscale_bounds="auto"``, once it ran.

    Examples
    --------
    >>> Request([0, 2], "independent", 2, (1.0, 4.0), "separable", 0, "auto", "cpu", "float64", None).mode
    'independent'
    """

    components: list[int]
    mode: str
    upsampling: int
    lengthscale_bounds: tuple | None
    kernel: str
    rank: int
    solver: str
    device: str
    dtype: str
    chunks: int | None
    observed: np.ndarray | None = None  # measured pixels inside crop, None for a complete fitted grid
    crop: tuple[slice, ...] | None = None  # bounding box of the measured pixels, None for the whole scan
    n_missing: int = 0
    lengthscale_scan: object | None = None  # the LengthscaleScan behind lengthscale_bounds="auto"

    @property
    def masked_solver(self) -> str:
        """The exact path for missing pixels, in :class:`~hyperspy_gp.gp.model.GridICMModel` terms.

        ``"schur"`` (Schur complement on the Kronecker basis) unless ``solver="dense"``.

        Returns
        -------
        str

        Examples
        --------
        >>> Request([0], "parallel", 1, None, "separable", 1, "dense", "cpu", "float64", None).masked_solver
        'dense'
        """
        return "dense" if self.solver == "dense" else "schur"

    def fitted_region(self, maps: np.ndarray) -> np.ndarray:
        """The part of ``maps`` the GP is fitted on: the box :attr:`crop`.

        Parameters
        ----------
        maps : numpy.ndarray
            Loading maps ``(*grid, T)`` of the whole scan.

        Returns
        -------
        numpy.ndarray
            ``maps`` inside :attr:`crop` (a view), or ``maps`` itself.

        Examples
        --------
        >>> request = Request([0], "parallel", 1, None, "separable", 1, "auto", "cpu", "float64", None)
        >>> request.crop = (slice(1, 3), slice(0, 4))
        >>> request.fitted_region(np.zeros((4, 4, 1))).shape
        (2, 4, 1)
        """
        return maps if self.crop is None else maps[self.crop]

    @property
    def iterative(self) -> bool:
        """Whether the complete grid is solved by CG and SLQ (:mod:`~hyperspy_gp.gp.iterative`).

        Returns
        -------
        bool

        Examples
        --------
        >>> Request([0], "parallel", 1, None, "matern", 1, "iterative", "cpu", "float64", None).iterative
        True
        """
        return self.solver == "iterative"


def validate_request(signal, components, mode, upsampling, bounds, kernel, rank, solver, device, dtype, chunks) -> Request:
    """Check ``signal`` and the options of :func:`hyperspy_gp.gp_reconstruct`.

    Nothing is computed and the signal is not modified.

    Parameters
    ----------
    signal : :class:`~hyperspy.api.signals.Signal1D`
        Spectrum image or line scan with decomposition results.
    components, mode, upsampling, kernel, rank, solver, device, dtype, chunks
        As in :func:`hyperspy_gp.gp_reconstruct`.
    bounds
        ``lengthscale_bounds`` of :func:`hyperspy_gp.gp_reconstruct`.

    Returns
    -------
    Request
        The normalised options, ``components`` as a list of indices.

    Raises
    ------
    ValueError
        With a message naming the parameter and the fix.

    Examples
    --------
    >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
    >>> s = atomic_eels_spectrum_image(shape=(8, 8), n_channels=16, seed=0)
    >>> s.decomposition(output_dimension=3, print_info=False)
    >>> validate_request(s, 2, "parallel", 2, None, "separable", 1, "auto", "cpu", "float64", None).components
    [0, 1]
    """
    from hyperspy.signal import BaseSignal

    if not isinstance(signal, BaseSignal) or signal.axes_manager.signal_dimension != 1:
        raise ValueError(
            "gp_reconstruct expects a spectrum image (a Signal1D with navigation axes), "
            f"got {type(signal).__name__}. Use s.as_signal1D(...) to make the energy axis the signal axis."
        )
    if np.issubdtype(signal.data.dtype, np.complexfloating):
        raise ValueError("gp_reconstruct works on real data; this signal is complex. Use s.real or s.amplitude.")
    n_nav = signal.axes_manager.navigation_dimension
    if n_nav == 0:
        raise ValueError(
            "This signal is a single spectrum (no navigation axes): there is no scan grid "
            "to reconstruct over. gp_reconstruct needs a line scan or a spectrum image."
        )
    if n_nav > 2:
        raise ValueError(
            f"gp_reconstruct supports 1 or 2 navigation dimensions, this signal has {n_nav}. "
            "Slice it with s.inav[...] into 2-D spectrum images first."
        )
    for axis in signal.axes_manager.navigation_axes:
        if not axis.is_uniform:
            raise ValueError(
                f"Navigation axis {axis.name!r} is not uniform; the GP needs a regular scan grid. "
                "Convert it with axis.convert_to_uniform_axis()."
            )
    if not hsglue.has_decomposition(signal):
        raise ValueError(
            "This signal has no decomposition results. Call s.decomposition() first "
            "(e.g. s.decomposition(algorithm='SVD') or algorithm='NMF', output_dimension=...)."
        )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}.")
    from hyperspy_gp.gp.kernels import KERNELS

    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}.")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, not {solver!r}.")
    if isinstance(upsampling, bool) or not isinstance(upsampling, (int, np.integer)) or upsampling < 1:
        raise ValueError(f"upsampling must be an integer >= 1, not {upsampling!r}.")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ValueError(f"rank must be an integer >= 0, not {rank!r}.")
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, (int, np.integer)) or chunks < 1):
        raise ValueError(f"chunks must be a positive number of rows of the upsampled grid, or None, not {chunks!r}.")
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', not {dtype!r}.")
    chosen = parse_components(components, hsglue.n_decomposition_components(signal))
    check_device(device)
    return Request(
        chosen, mode, int(upsampling), parse_bounds(bounds), kernel, int(rank), solver, device, dtype,
        None if chunks is None else int(chunks),
    )


def parse_components(components, n_available: int) -> list[int]:
    if components is None:
        if n_available > MAX_DEFAULT_COMPONENTS:
            raise ValueError(
                f"The decomposition has {n_available} components; choose how many to reconstruct, "
                "e.g. components=6 (see s.plot_explained_variance_ratio())."
            )
        return list(range(n_available))
    if isinstance(components, (int, np.integer)) and not isinstance(components, bool):
        if not 1 <= components <= n_available:
            raise ValueError(f"components={components} is out of range: the decomposition has {n_available} components.")
        return list(range(int(components)))
    try:
        chosen = [int(c) for c in components]
    except (TypeError, ValueError):
        raise ValueError(f"components must be an int or a list of ints, not {components!r}.") from None
    if not chosen:
        raise ValueError("components is empty: give at least one component index.")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"components has duplicated indices: {chosen}.")
    bad = [c for c in chosen if not 0 <= c < n_available]
    if bad:
        raise ValueError(f"components {bad} are out of range: valid indices are 0..{n_available - 1}.")
    return chosen


def parse_bounds(bounds):
    if bounds is None:
        return None
    if isinstance(bounds, str):
        if bounds == "auto":
            return "auto"
        raise ValueError(f"lengthscale_bounds must be a pair (lo, hi) in pixels, 'auto' or None, not {bounds!r}.")
    try:
        lo, hi = bounds
    except (TypeError, ValueError):
        raise ValueError(f"lengthscale_bounds must be a pair (lo, hi) in pixels, not {bounds!r}.") from None
    for name, value in (("lower", lo), ("upper", hi)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise ValueError(f"The {name} length-scale bound must be a positive number of pixels, not {value!r}.")
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"lengthscale_bounds=({lo}, {hi}): the lower bound must be smaller than the upper bound.")
    return (None if lo is None else float(lo), None if hi is None else float(hi))


def check_device(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was requested but torch sees no GPU. Use device='cpu'.")
    elif device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}.")


def check_maps(maps: np.ndarray, components: list[int]) -> np.ndarray:
    """Float64 maps ``(*grid, T)``; NaN marks a missing pixel, inf is refused.

    Parameters
    ----------
    maps : numpy.ndarray
        Loading maps ``(*grid, T)``.
    components : list of int
        Their component indices, for the messages.

    Returns
    -------
    numpy.ndarray
        ``maps`` as float64 (not copied when already float64).

    Raises
    ------
    ValueError
        For inf, fewer than two measured pixels, or a constant map (named by its
        component index from ``components``).

    Examples
    --------
    >>> check_maps(np.array([[1.0, 2.0], [1.0, 3.0]]), [4, 7])  # a line scan of 2 pixels, 2 maps
    Traceback (most recent call last):
    ...
    ValueError: Loading maps of components [4] are constant; leave them out of components.
    """
    maps = maps.astype(np.float64, copy=False)
    if np.isinf(maps).any():
        bad = sorted({components[i] for i in np.nonzero(np.isinf(maps.reshape(-1, maps.shape[-1])).any(0))[0]})
        raise ValueError(
            f"Loading maps of components {bad} contain inf: the decomposition failed on this data. "
            "Check the data for inf values and decompose again."
        )
    observed = np.isfinite(maps).all(axis=-1)
    if observed.sum() < 2:
        raise ValueError("Fewer than two scan pixels have finite loadings: there is no spatial structure to fit.")
    flat = maps[observed]
    constant = [components[i] for i in np.nonzero(np.ptp(flat, axis=0) == 0)[0]]
    if constant:
        raise ValueError(f"Loading maps of components {constant} are constant; leave them out of components.")
    return maps


def choose_solver(maps: np.ndarray, request: Request) -> np.ndarray | None:
    """Choose the exact path for ``maps``: set ``request.solver`` and ``request.crop``, return the mask.

    Missing pixels that fill whole rows or columns at the edges of the scan (a
    flyback column, a distorted first line, a border cut by a ``navigation_mask``) are
    cropped away: the GP is fitted on the box that bounds the measured pixels, which is
    exact, and predicts on the whole scan.  A complete box is solved in the Kronecker
    eigenbasis, or iteratively (``"iterative"``, :mod:`~hyperspy_gp.gp.iterative`) for
    ``kernel="matern"`` on more than :data:`MAX_DENSE_PIXELS` pixels.  With missing
    pixels inside the box, ``"auto"`` takes the cheaper exact path that fits:
    ``"dense"`` (Cholesky on the observed pixels, :mod:`~hyperspy_gp.gp.dense`) or
    ``"kronecker"`` with a Schur complement over the missing pixels
    (:mod:`~hyperspy_gp.gp.schur`).

    Parameters
    ----------
    maps : numpy.ndarray
        Loading maps ``(*grid, T)``, NaN where a pixel is missing.
    request : Request
        Its ``solver`` and ``mode`` decide.

    Returns
    -------
    numpy.ndarray or None
        Boolean mask of the measured pixels inside ``request.crop``, or ``None`` when
        that box is complete and solved without a mask.

    Raises
    ------
    ValueError
        When no exact path fits the missing pixels, or the forced one does not.

    Examples
    --------
    >>> maps = np.random.default_rng(0).normal(size=(6, 6, 2))
    >>> request = Request([0, 1], "parallel", 1, None, "separable", 1, "auto", "cpu", "float64", None)
    >>> choose_solver(maps, request) is None  # complete grid: Kronecker path
    True
    >>> maps[:, 0] = np.nan  # a missing edge column: fitted on the measured 6 × 5 box
    >>> choose_solver(maps, request) is None, request.crop, request.solver
    (True, (slice(0, 6, None), slice(1, 6, None)), 'kronecker')
    >>> maps[2, 3] = np.nan  # and a missing pixel inside: Schur complement on the Kronecker basis
    >>> int((~choose_solver(maps, request)).sum()), request.solver
    (1, 'kronecker')
    """
    from hyperspy_gp.gp.dense import MAX_DENSE_VALUES
    from hyperspy_gp.gp.schur import MAX_SCHUR_ENTRIES

    measured = np.isfinite(maps).all(axis=-1)
    request.n_missing = int((~measured).sum())
    box = measured_box(measured)
    request.crop = None if measured[box].shape == measured.shape else box
    observed = measured[box]
    large_matern = request.kernel == "matern" and observed.size > MAX_DENSE_PIXELS
    if observed.all() and request.solver != "dense":
        if request.solver == "auto":
            request.solver = "iterative" if large_matern else "kronecker"
        elif request.solver == "kronecker" and large_matern:
            raise ValueError(
                f"solver='kronecker' diagonalises kernel='matern' densely, which is limited to {MAX_DENSE_PIXELS} "
                f"pixels; this scan has {observed.size}. Use solver='auto' or 'iterative' (CG with a "
                "stochastic log-determinant), or kernel='separable'."
            )
        return None
    n_missing = int((~observed).sum())
    if request.solver == "iterative":
        raise ValueError(
            f"solver='iterative' needs a complete scan grid; {n_missing} pixels inside the box of the measured "
            "ones have no finite loadings (e.g. a navigation_mask). Use solver='auto', or decompose without a "
            "navigation_mask."
        )
    if large_matern:
        raise ValueError(
            f"kernel='matern' with missing pixels is solved densely, which is limited to {MAX_DENSE_PIXELS} "
            f"pixels; the box of the measured pixels has {observed.size}. Use kernel='separable', crop the scan "
            "with s.inav[...], or decompose without a navigation_mask."
        )
    tasks = maps.shape[-1] if request.mode == "parallel" else 1
    dense_values = int(observed.sum()) * tasks
    schur_entries = n_missing * tasks * observed.size * tasks
    fits = {"dense": dense_values <= MAX_DENSE_VALUES, "kronecker": schur_entries <= MAX_SCHUR_ENTRIES}
    if request.solver == "auto":
        # Cholesky of the observed covariance vs one structured solve per missing value.
        cost = {"dense": dense_values**3 / 3, "kronecker": n_missing * tasks * observed.size * (sum(observed.shape) + tasks)}
        feasible = [name for name in ("kronecker", "dense") if fits[name]]
        if not feasible:
            raise ValueError(
                f"{n_missing} of {observed.size} pixels in the box of the measured ones have no finite loadings "
                f"(e.g. a navigation_mask). Exact inference with missing pixels needs either at most "
                f"{MAX_DENSE_VALUES} observed values (here {dense_values}; dense solver) or few missing ones (here "
                f"{n_missing} × {tasks} maps on {observed.size} pixels; Kronecker solver with a Schur complement). "
                "Crop the scan with s.inav[...], choose fewer components or mode='independent', or decompose "
                "without a navigation_mask."
            )
        request.solver = min(feasible, key=cost.__getitem__)
    elif not fits[request.solver]:
        limit = (f"at most {MAX_DENSE_VALUES} observed values (here {dense_values})" if request.solver == "dense"
                 else f"few missing pixels ({n_missing} here, on {observed.size} pixels)")
        raise ValueError(
            f"solver={request.solver!r} with missing pixels needs {limit}. Use solver='auto', crop the scan "
            "with s.inav[...], or choose fewer components."
        )
    return observed


def measured_box(measured: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every measured pixel.

    Parameters
    ----------
    measured : numpy.ndarray
        Boolean grid, with at least one ``True`` pixel.

    Returns
    -------
    tuple of slice
        One slice per axis.

    Examples
    --------
    >>> measured = np.zeros((4, 5), dtype=bool)
    >>> measured[1:3, 2] = measured[2, 4] = True
    >>> measured_box(measured)
    (slice(1, 3, None), slice(2, 5, None))
    """
    box = []
    for axis in range(measured.ndim):
        others = tuple(a for a in range(measured.ndim) if a != axis)
        hits = np.flatnonzero(measured.any(axis=others))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def warn_masked_channels(factors: np.ndarray) -> None:
    """Channels without factors (a decomposition's ``signal_mask``) stay NaN, as in HyperSpy."""
    masked = ~np.isfinite(factors).all(axis=1)
    if masked.any():
        warnings.warn(
            f"{int(masked.sum())} of the {masked.size} channels have no spectral factors (NaN, e.g. "
            "excluded by the decomposition's signal_mask): the reconstructed spectra are NaN there, "
            "as in s.get_decomposition_model(). The GP loading maps are unaffected. To avoid the NaN "
            "channels, crop them with s.isig[...] before s.decomposition().",
            UserWarning,
            stacklevel=3,
        )
