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
from hyperspy_gp.memory import LOGDET_PROBES, VARIANCE_DRAWS

MODES = ("parallel", "independent")
SOLVERS = ("auto", "kronecker", "dense", "iterative")
#: ``components=None`` takes every component only up to this many.
MAX_DEFAULT_COMPONENTS = 10
#: Largest grid (pixels) on which the non-separable kernel can be diagonalised densely
#: (``solver="kronecker"``); beyond it ``solver="auto"`` takes the iterative path
#: (:mod:`~hyperspy_gp.gp.iterative`).
MAX_DENSE_PIXELS = 4096
#: Largest grid (pixels) on which ``solver="auto"`` diagonalises the non-separable kernel
#: densely: one ``n × n`` eigendecomposition per likelihood evaluation, ``O(n³)``.  Beyond
#: it the iterative path takes over where it serves (evenly spaced scan lines, missing
#: pixels within its cost limit).  Measured on 2 CPU cores, float64, 3 maps, likelihood +
#: gradient, dense against iterative: 24² 0.037 against 0.020 s, 32² 0.18 against
#: 0.023 s, 40² 0.52 against 0.035 s, 48² 1.6 against 0.050 s, 64² 12.3 against 0.096 s;
#: a whole reconstruction of 48² × 3 maps at 2× took 221 s against 10 s, with length
#: scales within 2·10⁻⁴ and variances within 0.03 % of each other; with 10 % of the
#: pixels missing at random, 374 s (Schur complement on the dense eigenbasis) against
#: 10 s (CG on the observed values), length scales within 3·10⁻⁴.
AUTO_DENSE_MATERN_PIXELS = 1024
#: Seconds per unit of work of each path for missing pixels (measured on 2 CPU cores,
#: float64, likelihood + gradient), to choose the cheapest: dense Cholesky per
#: (observed values)³; factorised Schur complement per missing pixel × T × grid values ×
#: (Σ factor sizes + missing pixels) (measured: 1.93 s for 164 pixels at 128² × 6, one BLAS
#: thread); Schur complement by CG per CG iteration × right-hand side × grid values ×
#: (Σ factor sizes + T); the iterative path (non-separable kernel) per multiply-add of
#: its missing pixels (:func:`~hyperspy_gp.gp.iterative_missing.missing_pixel_cost`) and
#: of its CG over the grid, taken as 6e10 for 128² × 6 maps (1.7 s measured there).
SECONDS_PER_UNIT = {"dense": 4e-11, "schur": 2.9e-10, "schur-cg": 1.5e-10, "iterative": 2.8e-11}
#: The same for the iterative path's missing pixels on a GPU: 9.2 s measured for a cost of
#: 4.0e13 (256² × 6 maps, a masked quarter disc; NVIDIA H200, float64).
GPU_SECONDS_PER_MISSING_UNIT = 2.3e-13
#: Multiply-adds per pixel and map of one evaluation of the iterative path's CG.
ITERATIVE_GRID_COST = 6e10 / (128 * 128 * 6)
#: CG iterations assumed by the cost model for scattered missing pixels (measured: 7–12
#: with 1 % missing at 128² × 6, 12–16 with 5 % at 64² × 6, one CG per whitened map) and
#: for masks with masked regions, where the count also stands for the coarse space's
#: construction and projection: 50–150 iterations, but whole runs took 7, 4 and 2.5 times
#: the cost of 50 per fit iteration (a quarter disc at 32² × 2, 48² × 3 and 128² × 6).
EXPECTED_CG_ITERATIONS = {"scattered": 15, "regions": 200}
#: An exact deterministic path is preferred unless the Schur complement by CG is
#: estimated to be this many times cheaper.
EXACT_PREFERENCE = 4.0


@dataclass
class Request:
    """Validated options of one reconstruction (see :func:`hyperspy_gp.gp_reconstruct`).

    Attributes
    ----------
    components
        Chosen component indices.
    mode, upsampling, lengthscale_bounds, kernel, rank, solver, device, dtype, chunks, variance_samples
        As the parameters of :func:`hyperspy_gp.gp_reconstruct`, normalised
        (``lengthscale_bounds`` is ``None``, ``"auto"`` or a pair of floats or ``None``).
    observed
        Boolean grid of the measured pixels on the fitted :attr:`lines`, for the
        solvers of missing pixels; ``None`` when the fitted grid is complete (set by
        :func:`choose_solver`).
    lines
        Indices, per scan axis, of the lines (rows, columns) that hold a measured
        pixel, when some lines hold none: the GP is fitted on the grid of those lines,
        which is exact (unmeasured pixels carry no data) and keeps its Kronecker
        structure, and predicts the whole scan.  ``None`` when every line is kept.
    n_missing
        Scan pixels without finite loadings, on skipped lines or not.
    schur_cg
        Whether the Schur complement over the missing pixels is solved by conjugate
        gradients with a stochastic log-determinant (too many missing pixels to
        factorise it; set by :func:`choose_solver`).
    exact_fallback
        With ``solver="auto"`` and the Schur complement by CG: the factorised exact path
        (``"schur"`` or ``"dense"``, in :attr:`masked_solver` terms) that also fits but
        was estimated slower, refitted with when CG fails during the fit; else ``None``.
    lengthscale_scan
        The :class:`~hyperspy_gp.lengthscale_scan.LengthscaleScan` behind
        ``lengthscale_bounds="auto"``, once it ran.
    dense_variance
        Whether ``solver="auto"`` fitted a complete scan of at most
        :data:`MAX_DENSE_PIXELS` pixels iteratively, so that a variance the iterative
        posterior would draw comes from the kernel's dense eigenbasis instead
        (:func:`~hyperspy_gp.maps_gp.exact_on_small_grids`); set by :func:`choose_solver`.

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
    observed: np.ndarray | None = None  # measured pixels on the fitted lines, None for a complete fitted grid
    lines: tuple[np.ndarray, ...] | None = None  # scan lines with a measured pixel, None for all
    schur_cg: bool = False  # the Schur complement by CG (many scattered missing pixels)
    exact_fallback: str | None = None  # factorised masked solver to refit with if CG fails ("auto" only)
    exact_posterior: bool = True  # after a fit by CG, the factorised posterior where it fits (memory budget)
    n_missing: int = 0
    lengthscale_scan: object | None = None  # the LengthscaleScan behind lengthscale_bounds="auto"
    variance_samples: int = VARIANCE_DRAWS  # draws of a Monte-Carlo variance, where the variance is not exact
    dense_variance: bool = False  # "auto" fitted a small complete scan iteratively: its dense variance where not exact

    @property
    def masked_solver(self) -> str:
        """The exact path for missing pixels, in :class:`~hyperspy_gp.gp.model.GridICMModel` terms.

        ``"schur"`` (Schur complement on the Kronecker basis, factorised) or
        ``"schur-cg"`` (by conjugate gradients, :attr:`schur_cg`) unless
        ``solver="dense"``, or ``"iterative"`` (conjugate gradients on the observed
        values, :mod:`~hyperspy_gp.gp.iterative_missing`) with ``solver="iterative"``.

        Returns
        -------
        str

        Examples
        --------
        >>> Request([0], "parallel", 1, None, "separable", 1, "dense", "cpu", "float64", None).masked_solver
        'dense'
        """
        if self.solver in ("dense", "iterative"):
            return self.solver
        return "schur-cg" if self.schur_cg else "schur"

    def fitted_region(self, maps: np.ndarray) -> np.ndarray:
        """The part of ``maps`` the GP is fitted on: the scan :attr:`lines` that hold data.

        Parameters
        ----------
        maps : numpy.ndarray
            Loading maps ``(*grid, T)`` of the whole scan.

        Returns
        -------
        numpy.ndarray
            ``maps`` on the kept lines, or ``maps`` itself.

        Examples
        --------
        >>> request = Request([0], "parallel", 1, None, "separable", 1, "auto", "cpu", "float64", None)
        >>> request.lines = (np.array([0, 2, 3]), np.arange(4))
        >>> request.fitted_region(np.zeros((4, 4, 1))).shape
        (3, 4, 1)
        """
        return maps if self.lines is None else maps[np.ix_(*self.lines)]

    def fitted_coordinates(self, grid_shape: tuple[int, ...]) -> tuple[list[int], list[np.ndarray]]:
        """Where the fitted grid sits in the scan: its first line and its lines relative to it.

        Relative coordinates make evenly spaced kept lines the regular grid ``0, 1, ...``
        that the iterative path needs, at an offset (``origin``) in the scan.

        Parameters
        ----------
        grid_shape : tuple of int
            The scan grid, numpy order.

        Returns
        -------
        origin : list of int
            Index of the first kept line per axis.
        points : list of numpy.ndarray
            Kept lines minus ``origin``, per axis (training coordinates in pixels).

        Examples
        --------
        >>> request = Request([0], "parallel", 1, None, "separable", 1, "auto", "cpu", "float64", None)
        >>> request.lines = (np.array([1, 2, 4]), np.arange(3))
        >>> origin, points = request.fitted_coordinates((5, 3))
        >>> origin, [p.tolist() for p in points]
        ([1, 0], [[0, 1, 3], [0, 1, 2]])
        """
        lines = self.lines or tuple(np.arange(n) for n in grid_shape)
        origin = [int(kept[0]) for kept in lines]
        return origin, [kept - start for kept, start in zip(lines, origin)]

    def skipped_lines(self, grid_shape: tuple[int, ...]) -> list[list[int]]:
        """Indices, per scan axis, of the lines left out of the fit for holding no data.

        Parameters
        ----------
        grid_shape : tuple of int
            The scan grid, numpy order.

        Returns
        -------
        list of list of int

        Examples
        --------
        >>> request = Request([0], "parallel", 1, None, "separable", 1, "auto", "cpu", "float64", None)
        >>> request.lines = (np.array([0, 2, 3]), np.arange(4))
        >>> request.skipped_lines((4, 4))
        [[1], []]
        """
        if self.lines is None:
            return [[] for _ in grid_shape]
        return [sorted(set(range(n)) - set(kept.tolist())) for n, kept in zip(grid_shape, self.lines)]

    @property
    def iterative(self) -> bool:
        """Whether the fitted grid is solved by CG and SLQ (:mod:`~hyperspy_gp.gp.iterative`), missing pixels too.

        Returns
        -------
        bool

        Examples
        --------
        >>> Request([0], "parallel", 1, None, "matern", 1, "iterative", "cpu", "float64", None).iterative
        True
        """
        return self.solver == "iterative"


def validate_request(signal, components, mode, upsampling, bounds, kernel, rank, solver, device, dtype, chunks,
                     variance_samples: int = VARIANCE_DRAWS) -> Request:
    """Check ``signal`` and the options of :func:`hyperspy_gp.gp_reconstruct`.

    Nothing is computed and the signal is not modified.

    Parameters
    ----------
    signal : :class:`~hyperspy.api.signals.Signal1D`
        Spectrum image or line scan with decomposition results.
    components, mode, upsampling, kernel, rank, solver, device, dtype, chunks, variance_samples
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
    if isinstance(variance_samples, bool) or not isinstance(variance_samples, (int, np.integer)) \
            or variance_samples < 2:
        raise ValueError(f"variance_samples must be an integer >= 2 (draws of a Monte-Carlo variance), "
                         f"not {variance_samples!r}.")
    chosen = parse_components(components, hsglue.n_decomposition_components(signal))
    check_device(device)
    return Request(
        chosen, mode, int(upsampling), parse_bounds(bounds), kernel, int(rank), solver, device, dtype,
        None if chunks is None else int(chunks), variance_samples=int(variance_samples),
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
    """Choose the exact path for ``maps``: set ``request.solver`` and ``request.lines``, return the mask.

    Scan lines (rows, columns) without a single measured pixel (a flyback column,
    distorted first lines, lines skipped by a sparse scan, a border cut by a
    ``navigation_mask``) are left out: the GP is fitted on the grid of the other lines,
    which is exact and keeps the Kronecker structure, and predicts the whole scan.  A
    complete fitted grid is solved in the Kronecker eigenbasis, or iteratively
    (``"iterative"``, :mod:`~hyperspy_gp.gp.iterative`, which needs evenly spaced
    lines: there, empty lines between measured ones are fitted as missing pixels
    instead) for ``kernel="matern"`` on more than :data:`AUTO_DENSE_MATERN_PIXELS` pixels
    (where the kernel's dense eigendecomposition, one per evaluation, costs more), which
    also serves missing pixels on the kept lines up to its cost limit
    (:mod:`~hyperspy_gp.gp.iterative_missing`); ``"auto"`` takes ``"dense"`` on the
    measured pixels instead where they fit and cost less (a sparse scan), and beyond
    :data:`MAX_DENSE_PIXELS` refuses when neither path serves (up to it, the paths below
    serve).  Else, with
    missing pixels on the kept lines, ``"auto"`` takes the cheaper exact path that fits:
    ``"dense"`` (Cholesky on the observed pixels, :mod:`~hyperspy_gp.gp.dense`) or
    ``"kronecker"`` with a Schur complement over the missing pixels, factorised
    (:mod:`~hyperspy_gp.gp.schur`); when neither fits (a sparse scan, many dead
    pixels), ``"kronecker"`` with the Schur complement solved by conjugate gradients and
    a stochastic log-determinant (``request.schur_cg``,
    :mod:`~hyperspy_gp.gp.schur_iterative`).

    Parameters
    ----------
    maps : numpy.ndarray
        Loading maps ``(*grid, T)``, NaN where a pixel is missing.
    request : Request
        Its ``solver`` and ``mode`` decide.

    Returns
    -------
    numpy.ndarray or None
        Boolean mask of the measured pixels on ``request.lines``, or ``None`` when that
        grid is complete and solved without a mask.

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
    >>> maps[:, [0, 3]] = np.nan  # two missing columns: fitted on the other 6 × 4 pixels
    >>> choose_solver(maps, request) is None, request.skipped_lines((6, 6)), request.solver
    (True, [[], [0, 3]], 'kronecker')
    >>> maps[2, 4] = np.nan  # and a missing pixel on a kept line: Schur complement on the Kronecker basis
    >>> int((~choose_solver(maps, request)).sum()), request.solver
    (1, 'kronecker')
    """
    from hyperspy_gp.gp.dense import MAX_DENSE_VALUES
    from hyperspy_gp.memory import MAX_SCHUR_ENTRIES, schur_entries

    measured = np.isfinite(maps).all(axis=-1)
    request.n_missing, request.schur_cg, request.exact_fallback = int((~measured).sum()), False, None
    request.dense_variance = False

    def fit_on(kept: tuple[np.ndarray, ...]) -> np.ndarray:
        """Fit on the scan lines ``kept`` (``request.lines``); their measured pixels."""
        request.lines = None if all(len(k) == n for k, n in zip(kept, measured.shape)) else kept
        return request.fitted_region(measured)

    lines = measured_lines(measured)
    observed = fit_on(lines)
    large_matern = request.kernel == "matern" and observed.size > MAX_DENSE_PIXELS
    even = all(np.all(np.diff(kept) == 1) for kept in lines)  # FFT products need evenly spaced lines
    # Between the two limits "auto" prefers the iterative path where it serves, and the
    # dense eigendecomposition of the kernel otherwise.
    prefer_iterative = request.solver == "auto" and request.kernel == "matern" and \
        observed.size > AUTO_DENSE_MATERN_PIXELS
    restored_lines = (large_matern or prefer_iterative or request.solver == "iterative") and not even
    if restored_lines:
        # FFT products need evenly spaced lines: the empty lines between kept ones join
        # the fit as missing pixels (those at the edges stay out).
        observed = fit_on(tuple(np.arange(kept[0], kept[-1] + 1) for kept in lines))
    if observed.all() and request.solver != "dense":
        if request.solver == "auto":
            request.solver = "iterative" if large_matern or prefer_iterative else "kronecker"
            request.dense_variance = prefer_iterative and not large_matern
        elif request.solver == "kronecker" and large_matern:
            raise ValueError(
                f"solver='kronecker' diagonalises kernel='matern' densely, which is limited to {MAX_DENSE_PIXELS} "
                f"pixels; this scan has {observed.size}. Use solver='auto' or 'iterative' (CG with a "
                "stochastic log-determinant), or kernel='separable'."
            )
        return None
    tasks = maps.shape[-1] if request.mode == "parallel" else 1
    dense_values = int(observed.sum()) * tasks
    if request.solver == "iterative" or (request.solver == "auto" and (large_matern or prefer_iterative)):
        from hyperspy_gp.gp.iterative_missing import missing_cost_limit

        limit = missing_cost_limit(request.device)
        cost = _iterative_missing_cost(observed, tasks, maps.shape[-1] // tasks)
        # A sparse scan (few measured values): the exact dense path unless the iterative
        # one, its missing pixels and CG over the grid, is much cheaper.
        iterative_seconds = SECONDS_PER_UNIT["iterative"] * (cost + ITERATIVE_GRID_COST * observed.size
                                                             * maps.shape[-1])
        dense_seconds = SECONDS_PER_UNIT["dense"] * float(dense_values) ** 3
        dense = request.solver == "auto" and dense_values <= MAX_DENSE_VALUES and \
            (dense_seconds < EXACT_PREFERENCE * iterative_seconds or (cost > limit and large_matern))
        if dense:
            request.solver = "dense"
        elif cost <= limit:
            request.solver = "iterative"
        elif request.solver == "iterative":  # forced: served beyond the limit, with its cost
            _warn_iterative_missing_cost(observed, cost, limit, request)
        elif large_matern:
            refusal = _iterative_missing_refusal(observed, cost, tasks, maps.shape[-1] // tasks, request)
            raise ValueError(f"{refusal} (The dense path needs at most {MAX_DENSE_VALUES} measured values, here "
                             f"{dense_values}.)")
        if request.solver != "auto":
            return observed
        # Up to MAX_DENSE_PIXELS, beyond the iterative path's limit: the exact paths below,
        # without the empty lines.
        if restored_lines:
            observed = fit_on(lines)
            if observed.all():
                request.solver = "kronecker"
                return None
            dense_values = int(observed.sum()) * tasks
    if large_matern and request.solver == "kronecker":
        raise ValueError(
            f"solver='kronecker' with kernel='matern' and missing pixels is limited to {MAX_DENSE_PIXELS} "
            f"pixels; the measured scan lines hold {observed.size}. Use solver='auto', 'iterative' (conjugate "
            "gradients on the observed pixels) or 'dense' (few measured pixels), or kernel='separable'."
        )
    n_missing = int((~observed).sum())
    fits = {"dense": dense_values <= MAX_DENSE_VALUES,
            "kronecker": schur_entries(observed.size, n_missing, tasks) <= MAX_SCHUR_ENTRIES}
    if request.solver == "auto":
        cost = _missing_pixel_costs(observed, request.kernel, dense_values, tasks)
        exact = [name for name in ("kronecker", "dense") if fits[name]]
        best = min(exact, key=cost.__getitem__) if exact else None
        # Many scattered missing pixels: the Schur complement by conjugate gradients.
        request.schur_cg = best is None or cost[best] > EXACT_PREFERENCE * cost["schur-cg"]
        request.solver = "kronecker" if request.schur_cg else best
        if request.schur_cg and best is not None:
            request.exact_fallback = "schur" if best == "kronecker" else "dense"
    elif request.solver == "dense" and not fits["dense"]:
        raise ValueError(
            f"solver='dense' with missing pixels needs at most {MAX_DENSE_VALUES} observed values (here "
            f"{dense_values}). Use solver='auto', crop the scan with s.inav[...], or choose fewer components."
        )
    else:
        request.schur_cg = request.solver == "kronecker" and not fits["kronecker"]
    return observed


def _iterative_missing_cost(observed: np.ndarray, tasks: int, models: int) -> int:
    """Multiply-adds per evaluation that the iterative path spends on the missing pixels of ``observed``."""
    from hyperspy_gp.gp.iterative_missing import missing_pixel_cost

    return models * missing_pixel_cost(observed, tasks)


def _iterative_missing_seconds(cost: float, device: str) -> float:
    """Estimated seconds per likelihood evaluation that the iterative path spends on its missing pixels."""
    on_gpu = str(device).startswith("cuda")
    return cost * (GPU_SECONDS_PER_MISSING_UNIT if on_gpu else SECONDS_PER_UNIT["iterative"])


def _duration(seconds: float) -> str:
    """``"about 40 s"``, ``"about 12 min"`` or ``"about 3 h"``."""
    if seconds < 120:
        return f"about {seconds:.0f} s"
    if seconds < 7200:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.0f} h"


def _warn_iterative_missing_cost(observed: np.ndarray, cost: float, limit: float, request: Request) -> None:
    """``solver="iterative"`` forced beyond the cost limit: served, with a warning of what it costs."""
    device = "GPU" if str(request.device).startswith("cuda") else "CPU"
    faster = " and much faster" if request.kernel == "separable" else ""
    warnings.warn(
        f"solver='iterative' with {int((~observed).sum())} missing pixels on this {observed.size}-pixel grid: its "
        f"preconditioner costs {_duration(_iterative_missing_seconds(cost, request.device))} per likelihood "
        f"evaluation on the {device} ({cost / limit:.1f}× the limit that solver='auto' keeps), and a fit takes tens "
        "of evaluations. Interrupting the fit (Ctrl-C, or Jupyter's stop button) keeps its best hyperparameters so "
        f"far. kernel='separable' with solver='auto' is exact for any number of missing pixels{faster}.",
        UserWarning,
        stacklevel=4,
    )


def _iterative_missing_refusal(observed: np.ndarray, cost: int, tasks: int, models: int, request: Request) -> str:
    """Why ``solver="auto"`` keeps off the iterative path (:mod:`~hyperspy_gp.gp.iterative_missing`) for the mask."""
    from hyperspy_gp.gp.iterative_missing import MAX_MISSING_COST_GPU, max_missing_pixels, missing_cost_limit

    gps = f"{models} independent GPs" if models > 1 else f"a parallel GP of {tasks} maps"
    on_gpu = str(request.device).startswith("cuda")
    missing = max_missing_pixels(observed.shape, tasks, models, device=request.device)
    measured = max_missing_pixels(observed.shape, tasks, models, side="observed", device=request.device)
    # On the CPU, say so where a GPU would serve the mask (its limit is about 170× higher).
    gpu = "" if on_gpu or cost > MAX_MISSING_COST_GPU else ", run it on a GPU (device='cuda'; its limit is higher)"
    return (
        f"kernel='matern' on more than {MAX_DENSE_PIXELS} pixels (solved iteratively) serves about {missing} "
        f"missing pixels scattered at random on this {observed.size}-pixel grid "
        f"with {gps}{' on a GPU' if on_gpu else ''}, or about {measured} measured ones (a sparse scan); "
        f"{int((~observed).sum())} pixels on the measured scan lines have no finite loadings (e.g. a "
        f"navigation_mask), {cost / missing_cost_limit(request.device):.1f}× its cost limit. Use "
        f"kernel='separable' (exact for any number of missing pixels){gpu}, crop the scan with s.inav[...], "
        "decompose without a navigation_mask, or force solver='iterative' "
        f"({_duration(_iterative_missing_seconds(cost, request.device))} per likelihood evaluation)."
    )


def _missing_pixel_costs(observed: np.ndarray, kernel: str, dense_values: int, tasks: int) -> dict:
    """Estimated seconds per likelihood evaluation of each path for the missing pixels of ``observed``.

    From :data:`SECONDS_PER_UNIT`, with :data:`EXPECTED_CG_ITERATIONS` for scattered
    pixels or for masked regions (:func:`~hyperspy_gp.gp.coarse_space.masked_interior`).
    """
    from hyperspy_gp.gp.coarse_space import masked_interior

    n, n_missing = observed.size, int((~observed).sum())
    factors = sum(observed.shape) if kernel == "separable" else n  # one dense factor for the Matérn kernel
    rhs = (1 + LOGDET_PROBES) * tasks
    iterations = EXPECTED_CG_ITERATIONS["regions" if masked_interior(observed).any() else "scattered"]
    return {
        "dense": SECONDS_PER_UNIT["dense"] * float(dense_values) ** 3,
        "kronecker": SECONDS_PER_UNIT["schur"] * n_missing * tasks * n * (factors + n_missing),
        "schur-cg": SECONDS_PER_UNIT["schur-cg"] * iterations * rhs * n * (factors + tasks),
    }


def measured_lines(measured: np.ndarray) -> tuple[np.ndarray, ...]:
    """Indices, per axis, of the scan lines that hold a measured pixel.

    Parameters
    ----------
    measured : numpy.ndarray
        Boolean grid, with at least one ``True`` pixel.

    Returns
    -------
    tuple of numpy.ndarray
        One increasing integer array per axis.

    Examples
    --------
    >>> measured = np.zeros((4, 5), dtype=bool)
    >>> measured[1:3, 2] = measured[2, 4] = True
    >>> [kept.tolist() for kept in measured_lines(measured)]
    [[1, 2], [2, 4]]
    """
    lines = []
    for axis in range(measured.ndim):
        others = tuple(a for a in range(measured.ndim) if a != axis)
        lines.append(np.flatnonzero(measured.any(axis=others)))
    return tuple(lines)


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
