"""``gp_reconstruct``: denoise and upsample decomposition loading maps with a GP.

The user-facing entry point.  It validates the request before any expensive work,
reads the signal's own decomposition (never re-running or changing it), fits an
exact GP (:mod:`hyperspy_gp.gp`) to the standardised loading maps, predicts mean and
variance on the upsampled grid and builds HyperSpy signals from them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hyperspy_gp import _hyperspy as hsglue
from hyperspy_gp.maps_gp import fit_and_predict_maps
from hyperspy_gp.memory import VARIANCE_DRAWS
from hyperspy_gp.outputs import build_outputs
from hyperspy_gp.request import (
    MODES,
    Request,
    check_maps,
    choose_solver,
    validate_request,
    warn_masked_channels,
)

_logger = logging.getLogger(__name__)

__all__ = ["gp_reconstruct", "GPReconstruction", "MODES"]


@dataclass
class GPReconstruction:
    """Everything one GP fit produces.

    Attributes
    ----------
    signal
        The reconstructed spectrum image (GP maps × factors, + mean if centred) on the
        upsampled navigation grid; same class as the input.  Its learning results hold
        the GP maps as loadings and the original factors, so
        ``signal.get_decomposition_loadings()`` and
        ``signal.plot_decomposition_results()`` work; hyperparameters and training
        history are in ``signal.metadata.GP_reconstruction``.
    loadings
        The GP loading maps, a stack ``(component | y, x)`` (``(component | x)`` for a
        line scan), with the predictive variance as a signal in
        ``metadata.Signal.Noise_properties.variance``.
    hyperparameters
        Fitted hyperparameters in the units of the maps (see :func:`gp_reconstruct`).
    history
        Per-iteration hyperparameters and log likelihood (standardised units).

    Examples
    --------
    >>> from hyperspy_gp import gp_reconstruct
    >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
    >>> s = atomic_eels_spectrum_image(shape=(12, 12), n_channels=32, seed=0)
    >>> s.decomposition(output_dimension=2, print_info=False)
    >>> rec = gp_reconstruct(s, components=2, upsampling=2)
    >>> rec.loadings.data.shape, rec.hyperparameters["lengthscale_px"].shape
    ((2, 24, 24), (2, 2))
    """

    signal: object
    loadings: object
    hyperparameters: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)

    @property
    def variance(self):
        """Predictive variance of the loading maps (a signal shaped like ``loadings``).

        Examples
        --------
        >>> from hyperspy_gp import gp_reconstruct
        >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
        >>> s = atomic_eels_spectrum_image(shape=(12, 12), n_channels=32, seed=0)
        >>> s.decomposition(output_dimension=2, print_info=False)
        >>> rec = gp_reconstruct(s, components=2)
        >>> rec.variance.data.shape == rec.loadings.data.shape
        True
        >>> bool((rec.variance.data >= 0).all())
        True
        """
        return self.loadings.metadata.Signal.Noise_properties.variance

    def plot_history(self, all_b: bool = False):
        """Plot the training history; see :func:`hyperspy_gp.plotting.plot_history`.

        Parameters
        ----------
        all_b : bool
            Also draw the off-diagonal entries ``B_ij`` (dashed) of a parallel GP.

        Returns
        -------
        matplotlib.figure.Figure

        Examples
        --------
        >>> import matplotlib.pyplot as plt
        >>> from hyperspy_gp import gp_reconstruct
        >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
        >>> s = atomic_eels_spectrum_image(shape=(12, 12), n_channels=32, seed=0)
        >>> s.decomposition(output_dimension=2, print_info=False)
        >>> fig = gp_reconstruct(s, components=2).plot_history()
        >>> len(fig.axes)
        4
        >>> plt.close(fig)
        """
        from hyperspy_gp.plotting import plot_history

        return plot_history(self, all_b=all_b)


def gp_reconstruct(
    signal,
    components: int | Sequence[int] | None = None,
    mode: str = "parallel",
    upsampling: int = 1,
    lengthscale_bounds: tuple[float | None, float | None] | str | None = None,
    isotropic: bool = False,
    kernel: str = "separable",
    rank: int = 1,
    solver: str = "auto",
    max_iter: int = 1000,
    tol: float = 1e-9,
    device: str = "cpu",
    dtype: str = "float64",
    lazy_output: bool | None = None,
    chunks: int | None = None,
    show_progressbar: bool | None = None,
    memory_budget: int | float | str | None = None,
    variance_samples: int = VARIANCE_DRAWS,
) -> GPReconstruction:
    """Reconstruct decomposition loading maps with an exact Gaussian process.

    Each chosen loading map ``A_i(y, x)`` of ``signal``'s decomposition is treated as
    a noisy sample of a smooth 2-D (or 1-D for a line scan) function on the scan grid
    and reconstructed by GP regression with a Matérn-5/2 kernel, then multiplied by
    its spectral factor ``w_i(E)`` to give a denoised, optionally upsampled spectrum
    image.  Works on any :class:`~hyperspy.api.signals.Signal1D` (EELS, CL, ...) with
    one or two navigation dimensions after ``signal.decomposition()``.

    Parameters
    ----------
    signal : :class:`~hyperspy.api.signals.Signal1D`
        Spectrum image with decomposition results; neither it nor its
        ``learning_results`` are modified.
    components : int, list of int or None
        An int ``N`` takes the first ``N`` components, a list takes those indices.
        ``None`` takes all of them when there are at most 10.
    mode : {"parallel", "independent"}
        ``"parallel"``: one multi-output GP for all maps, with a shared spatial kernel
        and an intrinsic-coregionalization task covariance ``B = W Wᵀ + diag(v)`` and
        one noise level per map, so low-noise maps lend their spatial structure to
        noisy ones.  ``"independent"``: one GP per map, each with its own length
        scales, output scale and noise.
    upsampling : int
        Integer factor of the output grid density.  Original pixel ``i`` is output
        pixel ``i·upsampling`` (same coordinate); the axis scale is divided by it.
    lengthscale_bounds : (float or None, float or None) or "auto", optional
        Hard bounds on the length scales, in pixels of the original scan.  An upper
        bound near the atomic spacing keeps atomic contrast that an unconstrained fit
        may smooth away, more often the more pixels are missing (half of them, at
        random, was enough on a synthetic atomic image: docs, "Limits").  ``"auto"``
        first runs a length-scale scan of the chosen maps
        (:func:`hyperspy_gp.lengthscale_scan.lengthscale_scan`) and takes the
        bounds it suggests around the finest basin of the likelihood (no bounds if it
        finds none); the scan is kept in the metadata settings.  Default: length
        scale ≥ 0.5 px.
    isotropic : bool
        One length scale for both scan axes instead of one per axis.
    kernel : {"separable", "matern"}
        ``"separable"`` (default): product of 1-D Matérn-5/2 kernels, exact and fast
        on any grid size (Kronecker structure).  ``"matern"``: the non-separable
        anisotropic Matérn-5/2 of the method's paper: exact through dense algebra
        up to 1024 pixels (one eigendecomposition per evaluation), iterative beyond
        (see ``solver="iterative"``).
    rank : int
        Rank of ``W`` in the parallel model's task covariance.
    solver : {"auto", "kronecker", "dense", "iterative"}
        Exact inference path.  ``"kronecker"``: the spatial eigenbasis of the full grid,
        fast at any size; with missing pixels (NaN loadings, e.g. from a
        decomposition's ``navigation_mask``) plus a Schur complement over them,
        factorised for a few missing pixels (missing pixels × grid pixels × maps ≤ 32
        million), by conjugate gradients with a stochastic log-determinant beyond or
        where that is much faster (the variance exact where the factorised complement
        fits or streaming it over the output grid is affordable, see
        :func:`~hyperspy_gp.memory.streamed_increase_fits`, else a Monte-Carlo
        estimate, its standard error in ``hyperparameters["variance_standard_error"]``).
        ``"dense"``: Cholesky on the observed pixels, limited to 6000 observed values
        (pixels × maps in a parallel GP).  ``"iterative"`` (any kernel, complete grids
        or missing pixels; ``"auto"`` takes it up to a cost limit, e.g. about 3500 scattered
        on 128 × 128 × 6 maps, any number there on a GPU, see
        :func:`~hyperspy_gp.gp.iterative_missing.max_missing_pixels`; forced, it serves
        any mask, with a warning of its time per evaluation): FFT products,
        preconditioned conjugate gradients and a stochastic log-determinant; the mean
        is exact, the variance exact window by window near the edges and missing
        pixels where that is affordable, else within a stated bound by shorter windows
        (the bound of every pixel returned as
        ``hyperparameters["variance_standard_error"]``, the windows' margin as
        ``hyperparameters["variance_window_lengthscales"]``), else a Monte-Carlo
        estimate whose standard error is returned there (see
        :mod:`hyperspy_gp.gp.iterative_prediction`).  ``"auto"`` takes ``"kronecker"`` for complete
        grids and the cheaper exact path that fits otherwise; for ``kernel="matern"``
        beyond 1024 pixels it takes ``"iterative"`` (where it serves; up to 4096 pixels
        the dense eigendecomposition otherwise), or ``"dense"`` for a sparse scan
        where that is cheaper.  Missing pixels are predicted like
        any other; scan lines without a measured pixel are left out
        of the fit first (exact, the Kronecker structure is kept), so only the
        missing pixels on the kept lines count against these limits.  Where
        conjugate gradients stop converging during the fit (large masked regions, low
        noise), the fit stops at its best iterate with a ``ConvergenceWarning``;
        ``"auto"`` then refits with the factorised exact path instead, where one fits
        the memory budget (a ``UserWarning`` says so).
    max_iter, tol : int, float
        Iteration cap and relative tolerance of the L-BFGS-B likelihood maximisation;
        a ``ConvergenceWarning`` is issued when the cap is reached.
    device : str
        Torch device, ``"cpu"`` or ``"cuda"``.
    dtype : {"float64", "float32"}
        Precision of the GP computations.
    lazy_output : bool or None
        Return a lazy reconstructed spectrum image; ``None`` follows the input.  It is
        built chunk by chunk from the GP maps (never held whole): the whole signal axis
        per chunk, navigation chunks sized by dask's ``array.chunk-size``, as
        ``s.get_decomposition_model(lazy_output=True)``; ``save(..., "zspy")`` streams it.
    chunks : int or None
        Rows of the upsampled grid predicted per dask task; ``None`` chooses them to
        keep each task's temporaries under 64 MB (on the iterative path, at least twice
        the rows within the kernel's reach, about 19 length scales, and all rows where
        its variance is drawn: the draws take whole maps).  Prediction runs on the
        current dask scheduler (a ``dask.distributed`` client, if one is active); on the
        threaded one each task writes its rows straight into the result.
    show_progressbar : bool or None
        Show training progress (tqdm) and the prediction chunks (dask's progress bar);
        ``None`` follows HyperSpy's preference.
    memory_budget : int, float, str or None
        Largest peak memory (bytes, or a string such as ``"16 GB"``) the request may
        need; it is estimated before fitting (:mod:`hyperspy_gp.memory`) and a
        request over budget raises :class:`~hyperspy_gp.memory.MemoryBudgetError`.
        ``None``: ``hyperspy_gp.memory.DEFAULT_MEMORY_BUDGET``, by default 80 % of
        the available RAM; ``float("inf")`` turns the check off.  With
        ``device="cuda"`` the GP's working memory is also checked against the memory
        free on the GPU (``float("inf")`` turns that check off too).
    variance_samples : int
        Draws of the Monte-Carlo variance, where the variance is neither exact nor
        bounded by windows (``kernel="matern"`` on the iterative path with length
        scales beyond its windows' reach; the Schur complement by CG beyond the limits
        of its exact variance).  Its standard error, returned as
        ``hyperparameters["variance_standard_error"]``, falls as
        ``1/√variance_samples`` (on the iterative path with the default 64 a few per
        cent of the variance within a few length scales of the edges and missing pixels,
        nearly nothing further inside), and the prediction's time grows in proportion.
        Exact and windowed variances ignore it.  With fewer than 8 draws the iterative path's
        variance leaves out its control variate (and so many draws give an unreliable
        standard error).

    Returns
    -------
    GPReconstruction
        ``.signal`` (reconstructed spectrum image), ``.loadings`` (GP maps with
        variance), ``.hyperparameters`` and ``.history``.  Hyperparameters are
        ``lengthscale_px`` and ``lengthscale_calibrated`` (per map × axis, numpy axis
        order), ``task_covariance`` ``B`` and ``noise_variance`` (units of the maps),
        ``log_likelihood``, ``iterations``, ``converged``, ``gradient_norm`` and
        ``jitter`` (per map, units of ``noise_variance``: the diagonal added when the
        covariance was numerically singular, with a ``JitterWarning``; normally 0).

    Raises
    ------
    ValueError
        For a signal without decomposition, without navigation axes, with complex
        data or non-uniform axes, non-finite or constant maps, or invalid parameters.
    hyperspy_gp.memory.MemoryBudgetError
        (a ``MemoryError`` and a ``ValueError``) when the estimated memory exceeds
        ``memory_budget`` or the GPU's free memory, or when the GPU runs out of memory
        during the fit; the message gives the estimate and what to change.

    Examples
    --------
    >>> import hyperspy.api as hs
    >>> from hyperspy_gp import gp_reconstruct
    >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
    >>> s = atomic_eels_spectrum_image(shape=(16, 16), n_channels=64, seed=0)
    >>> s.decomposition(output_dimension=3, print_info=False)
    >>> rec = gp_reconstruct(s, components=3, upsampling=2)
    >>> rec.signal.axes_manager.navigation_shape
    (32, 32)
    >>> rec.loadings.data.shape, rec.variance.data.shape
    ((3, 32, 32), (3, 32, 32))
    """
    request = validate_request(
        signal, components, mode, upsampling, lengthscale_bounds, kernel, rank, solver, device, dtype, chunks,
        variance_samples,
    )
    decomposition = hsglue.read_decomposition(signal, request.components)
    maps = check_maps(decomposition.maps, request.components)
    warn_masked_channels(decomposition.factors)
    request.observed = choose_solver(maps, request)
    lazy = hsglue.is_lazy(signal) if lazy_output is None else bool(lazy_output)
    _check_memory(maps, decomposition, request, lazy, memory_budget)
    show_progressbar = hsglue.resolve_show_progressbar(show_progressbar)
    if request.lengthscale_bounds == "auto":
        _choose_lengthscale_bounds(maps, request, isotropic, signal, show_progressbar)
    fit = fit_and_predict_maps(
        maps, request, isotropic=isotropic, max_iter=max_iter, tol=tol, show_progressbar=show_progressbar
    )
    reconstructed, loadings, hyperparameters = build_outputs(signal, decomposition, fit, request, lazy, isotropic)
    return GPReconstruction(reconstructed, loadings, hyperparameters, fit.history)


def _choose_lengthscale_bounds(maps, request: Request, isotropic: bool, signal, show_progressbar: bool) -> None:
    """``lengthscale_bounds="auto"``: scan the maps and take the suggested bounds."""
    from hyperspy_gp.lengthscale_scan import scan_loading_maps

    scan = scan_loading_maps(
        request.fitted_region(maps), points=request.fitted_coordinates(maps.shape[:-1])[1],
        components=request.components, observed=request.observed,
        masked_solver=request.masked_solver, iterative=request.iterative,
        axes_names=[str(a.name) for a in hsglue.navigation_axes(signal)], isotropic=isotropic,
        kernel=request.kernel, device=request.device, dtype=request.dtype, show_progressbar=show_progressbar,
    )
    if scan.suggestion is None:
        _logger.info("Length-scale scan: no basin below %.3g px; fitting without bounds.", scan.upper_bounds[-1])
    request.lengthscale_scan, request.lengthscale_bounds = scan, scan.suggestion


def _check_memory(maps: np.ndarray, decomposition, request: Request, lazy: bool, memory_budget) -> None:
    from hyperspy_gp.memory import check_device_memory, check_memory_budget

    estimate = _estimate_memory(maps, decomposition, request, lazy, request.masked_solver)
    if request.masked_solver == "schur-cg" and not _within_budget(estimate, request.device, memory_budget):
        # The exact posterior after a fit by CG (factorised or streamed) is optional: the
        # Monte-Carlo one may need less (or, with few missing pixels, more: then the exact
        # one is reported).
        request.exact_posterior = False
        monte_carlo = _estimate_memory(maps, decomposition, request, lazy, request.masked_solver)
        if _within_budget(monte_carlo, request.device, memory_budget):
            estimate = monte_carlo
        else:
            request.exact_posterior = True
    _logger.info("Estimated memory: %s", estimate.describe())
    check_memory_budget(estimate, memory_budget)
    check_device_memory(estimate, request.device, memory_budget)
    if request.exact_fallback is not None:  # the refit if CG fails: only where it fits too
        fallback = _estimate_memory(maps, decomposition, request, lazy, request.exact_fallback)
        if not _within_budget(fallback, request.device, memory_budget):
            _logger.info("No exact fallback for the Schur complement by CG: %s", fallback.describe())
            request.exact_fallback = None


def _within_budget(estimate, device: str, memory_budget) -> bool:
    """Whether ``estimate`` passes the memory checks of :func:`_check_memory`."""
    from hyperspy_gp.memory import MemoryBudgetError, check_device_memory, check_memory_budget

    try:
        check_memory_budget(estimate, memory_budget)
        check_device_memory(estimate, device, memory_budget)
    except MemoryBudgetError:
        return False
    return True


def _estimate_memory(maps: np.ndarray, decomposition, request: Request, lazy: bool, masked_solver: str):
    """:func:`~hyperspy_gp.memory.estimate_memory` of ``request`` with ``masked_solver`` for missing pixels."""
    from hyperspy_gp.memory import estimate_memory

    n_coarse, n_jacobi_values = 0, None
    if request.observed is not None and masked_solver == "schur-cg":
        from hyperspy_gp.gp.coarse_space import coarse_points
        from hyperspy_gp.gp.kernels import GridKernel
        from hyperspy_gp.gp.schur_iterative import jacobi_block_values

        n_models, n_tasks = (1, maps.shape[-1]) if request.mode == "parallel" else (maps.shape[-1], 1)
        # One lattice per number of whitened maps that get the coarse space.
        n_coarse = [int(coarse_points(request.observed, n_models, maps).sum()) for maps in range(1, n_tasks + 1)]
        factor_shape = GridKernel(request.observed.shape, request.kernel).factor_shape
        n_jacobi_values = jacobi_block_values(request.observed, factor_shape, n_tasks, regions=n_coarse[0] > 0)
    return estimate_memory(
        maps.shape[:-1], maps.shape[-1], decomposition.factors.shape[0], mode=request.mode,
        upsampling=request.upsampling, kernel=request.kernel, dtype=request.dtype, lazy_output=lazy,
        n_observed=int(request.observed.sum()) if request.observed is not None and masked_solver == "dense" else None,
        n_missing=0 if request.observed is None else int((~request.observed).sum()), chunks=request.chunks,
        iterative=request.iterative, schur_cg=masked_solver == "schur-cg", n_coarse=n_coarse,
        n_jacobi_values=n_jacobi_values, exact_posterior=request.exact_posterior, device=request.device,
        variance_samples=request.variance_samples,
    )
