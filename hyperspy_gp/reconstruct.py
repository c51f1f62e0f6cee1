"""``gp_reconstruct``: denoise and upsample decomposition loading maps with a GP.

The user-facing entry point.  It validates the request before any expensive work,
reads the signal's own decomposition (never re-running or changing it), fits an
exact GP (:mod:`hyperspy_gp.gp`) to the standardised loading maps, predicts mean and
variance on the upsampled grid and builds HyperSpy signals from them.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hyperspy_gp import _hyperspy as hsglue

_logger = logging.getLogger(__name__)

MODES = ("parallel", "independent")
SOLVERS = ("auto", "kronecker", "dense")
#: ``components=None`` takes every component only up to this many.
MAX_DEFAULT_COMPONENTS = 10
#: Largest grid (pixels) for the dense non-separable kernel.
MAX_DENSE_PIXELS = 4096


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
        may smooth away.  ``"auto"`` first runs a length-scale scan of the chosen
        maps (:func:`hyperspy_gp.lengthscale_scan.lengthscale_scan`) and takes the
        bounds it suggests around the finest basin of the likelihood (no bounds if it
        finds none); the scan is kept in the metadata settings.  Default: length
        scale ≥ 0.5 px.
    isotropic : bool
        One length scale for both scan axes instead of one per axis.
    kernel : {"separable", "matern"}
        ``"separable"`` (default): product of 1-D Matérn-5/2 kernels, exact and fast
        on any grid size (Kronecker structure).  ``"matern"``: the non-separable
        anisotropic Matérn-5/2, exact through dense algebra, limited to 4096 pixels.
    rank : int
        Rank of ``W`` in the parallel model's task covariance.
    solver : {"auto", "kronecker", "dense"}
        Exact inference path.  ``"kronecker"``: the spatial eigenbasis of the full grid,
        fast at any size.  ``"dense"``: Cholesky on the observed pixels, needed when
        pixels are missing (NaN loadings, e.g. from a decomposition's
        ``navigation_mask``) and limited to 6000 observed values (pixels × maps in a
        parallel GP).  ``"auto"`` takes ``"kronecker"`` for complete grids and
        ``"dense"`` otherwise.  Missing pixels are predicted like any other.
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
        keep each task's temporaries under 64 MB.  Prediction runs on the current dask
        scheduler (a ``dask.distributed`` client, if one is active).
    show_progressbar : bool or None
        Show training progress (tqdm) and the prediction chunks (dask's progress bar);
        ``None`` follows HyperSpy's preference.
    memory_budget : int, float, str or None
        Largest peak memory (bytes, or a string such as ``"16 GB"``) the request may
        need; it is estimated before fitting (:mod:`hyperspy_gp.memory`) and a
        request over budget raises :class:`~hyperspy_gp.memory.MemoryBudgetError`.
        ``None``: ``hyperspy_gp.memory.DEFAULT_MEMORY_BUDGET``, by default 80 % of
        the available RAM; ``float("inf")`` turns the check off.

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
        ``memory_budget``; the message gives the estimate and what to change.

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
    request = _validate(
        signal, components, mode, upsampling, lengthscale_bounds, kernel, rank, solver, device, dtype, chunks
    )
    decomposition = hsglue.read_decomposition(signal, request.components)
    maps = _check_maps(decomposition.maps, request.components)
    _warn_masked_channels(decomposition.factors)
    request.observed = _choose_solver(maps, request)
    lazy = signal._lazy if lazy_output is None else bool(lazy_output)
    _check_memory(maps, decomposition, request, lazy, memory_budget)
    if request.lengthscale_bounds == "auto":
        _choose_lengthscale_bounds(maps, request, isotropic, signal, hsglue.resolve_show_progressbar(show_progressbar))
    fit = _fit_and_predict(
        maps,
        request,
        isotropic=isotropic,
        max_iter=max_iter,
        tol=tol,
        show_progressbar=hsglue.resolve_show_progressbar(show_progressbar),
    )
    return _build_outputs(signal, decomposition, fit, request, lazy, isotropic)


@dataclass
class _Request:
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
    observed: np.ndarray | None = None  # measured pixels, None for the Kronecker path
    lengthscale_scan: object | None = None  # the LengthscaleScan behind lengthscale_bounds="auto"


def _validate(signal, components, mode, upsampling, bounds, kernel, rank, solver, device, dtype, chunks) -> _Request:
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
    chosen = _parse_components(components, hsglue.n_decomposition_components(signal))
    if kernel == "matern" and signal.axes_manager.navigation_size > MAX_DENSE_PIXELS:
        raise ValueError(
            f"kernel='matern' uses dense algebra, limited to {MAX_DENSE_PIXELS} pixels; this scan has "
            f"{signal.axes_manager.navigation_size}. Use kernel='separable'."
        )
    _check_device(device)
    return _Request(
        chosen, mode, int(upsampling), _parse_bounds(bounds), kernel, int(rank), solver, device, dtype,
        None if chunks is None else int(chunks),
    )


def _parse_components(components, n_available: int) -> list[int]:
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


def _parse_bounds(bounds):
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


def _choose_lengthscale_bounds(maps, request: _Request, isotropic: bool, signal, show_progressbar: bool) -> None:
    """``lengthscale_bounds="auto"``: scan the maps and take the suggested bounds."""
    from hyperspy_gp.lengthscale_scan import scan_loading_maps

    scan = scan_loading_maps(
        maps, components=request.components, observed=request.observed,
        axes_names=[str(a.name) for a in hsglue.navigation_axes(signal)], isotropic=isotropic,
        kernel=request.kernel, device=request.device, dtype=request.dtype, show_progressbar=show_progressbar,
    )
    if scan.suggestion is None:
        _logger.info("Length-scale scan: no basin below %.3g px; fitting without bounds.", scan.upper_bounds[-1])
    request.lengthscale_scan, request.lengthscale_bounds = scan, scan.suggestion


def _check_memory(maps: np.ndarray, decomposition, request: _Request, lazy: bool, memory_budget) -> None:
    from hyperspy_gp.memory import check_memory_budget, estimate_memory

    estimate = estimate_memory(
        maps.shape[:-1], maps.shape[-1], decomposition.factors.shape[0], mode=request.mode,
        upsampling=request.upsampling, kernel=request.kernel, dtype=request.dtype, lazy_output=lazy,
        n_observed=None if request.observed is None else int(request.observed.sum()), chunks=request.chunks,
    )
    _logger.info("Estimated memory: %s", estimate.describe())
    check_memory_budget(estimate, memory_budget)


def _check_device(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was requested but torch sees no GPU. Use device='cpu'.")
    elif device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}.")


def _warn_masked_channels(factors: np.ndarray) -> None:
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


def _check_maps(maps: np.ndarray, components: list[int]) -> np.ndarray:
    """Float64 maps; NaN marks a missing pixel, inf is refused."""
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


def _choose_solver(maps: np.ndarray, request: _Request) -> np.ndarray | None:
    """The observed-pixel mask for the dense path, or ``None`` for the Kronecker path."""
    from hyperspy_gp.gp.dense import MAX_DENSE_VALUES

    observed = np.isfinite(maps).all(axis=-1)
    complete = bool(observed.all())
    if request.solver == "kronecker" and not complete:
        raise ValueError(
            f"{int((~observed).sum())} scan pixels have no finite loadings (e.g. a navigation_mask); "
            "solver='kronecker' needs a complete grid. Use solver='auto' or 'dense'."
        )
    if request.solver == "kronecker" or (request.solver == "auto" and complete):
        return None
    values = int(observed.sum()) * (maps.shape[-1] if request.mode == "parallel" else 1)
    if values > MAX_DENSE_VALUES:
        raise ValueError(
            f"The dense solver (used when pixels are missing) would factorise {values} observed values "
            f"(limit {MAX_DENSE_VALUES}). Crop the scan with s.inav[...], choose fewer components or "
            "mode='independent', or decompose without a navigation_mask."
        )
    return observed


@dataclass
class _FitOutput:
    mean: np.ndarray  # (*upsampled_grid, T), map units
    variance: np.ndarray
    hyperparameters: dict
    history: dict


def _fit_and_predict(maps, request: _Request, isotropic, max_iter, tol, show_progressbar) -> _FitOutput:
    import dask
    import torch

    from hyperspy_gp.gp.kernels import GridKernel
    from hyperspy_gp.gp.model import GridICMModel
    from hyperspy_gp.gp.prediction import make_posterior
    from hyperspy_gp.gp.training import fit_model

    grid = maps.shape[:-1]
    n_maps = maps.shape[-1]
    measured = np.isfinite(maps).all(axis=-1)
    centre, scale = maps[measured].mean(axis=0), maps[measured].std(axis=0)
    standardised = np.where(measured[..., None], (maps - centre) / scale, 0.0)
    torch_dtype = getattr(torch, request.dtype)
    kernel = GridKernel(grid, request.kernel, dtype=torch_dtype, device=request.device)
    if request.mode == "parallel":
        targets = standardised[None]
        model = GridICMModel(kernel, 1, n_maps, rank=request.rank, isotropic=isotropic,
                             lengthscale_bounds=request.lengthscale_bounds, observed=request.observed)
    else:
        targets = np.moveaxis(standardised, -1, 0)[..., None]
        model = GridICMModel(kernel, n_maps, 1, rank=0, isotropic=isotropic,
                             lengthscale_bounds=request.lengthscale_bounds, observed=request.observed)
    targets_t = torch.as_tensor(np.ascontiguousarray(targets), dtype=torch_dtype, device=request.device)
    result = fit_model(model, targets_t, max_iter=max_iter, tol=tol, show_progressbar=show_progressbar)

    posterior = make_posterior(model, targets_t)
    test_coords = [kernel.axis_coordinates(n, request.upsampling) for n in grid]
    with hsglue.dask_progressbar(show_progressbar):
        mean, variance = dask.compute(*posterior.predict_dask(test_coords, chunk_rows=request.chunks))
    mean, variance = _per_map(mean, request.mode), _per_map(variance, request.mode)
    mean = centre + scale * mean
    variance = scale**2 * variance
    hyper = _hyperparameters(model, result, request.mode, scale, int(measured.sum()))
    hyper["jitter"] = _report_jitter(posterior.jitter.detach().cpu().numpy(), request.mode, scale)
    return _FitOutput(mean, variance, hyper, result.history)


def _report_jitter(jitter: np.ndarray, mode: str, scale: np.ndarray) -> np.ndarray:
    """Jitter per map in map units (like ``noise_variance``); warn when any was added."""
    from hyperspy_gp.gp.cholesky import JitterWarning

    per_map = (jitter[0] if mode == "parallel" else jitter) * scale**2
    if np.any(per_map > 0):
        warnings.warn(
            f"The GP covariance was numerically singular (very long length scales, near-zero "
            f"noise or nearly identical maps); jitter {np.array2string(per_map, precision=3)} was "
            "added to the noise variance of the maps to factorise it. It is recorded as "
            "hyperparameters['jitter']; consider a smaller upper length-scale bound or fewer components.",
            JitterWarning,
            stacklevel=4,
        )
    return per_map


def _per_map(x: np.ndarray, mode: str) -> np.ndarray:
    """``(P, *grid, T)`` → ``(*grid, n_maps)``."""
    return x[0] if mode == "parallel" else np.moveaxis(x[..., 0], 0, -1)


def _hyperparameters(model, result, mode: str, scale: np.ndarray, n_pixels: int) -> dict:
    state = {k: v.detach().cpu().numpy() for k, v in model.state().items()}
    n_maps = scale.size
    if mode == "parallel":
        lengthscale = np.repeat(state["lengthscale"], n_maps, axis=0)
        b = state["task_covariance"][0] * np.outer(scale, scale)
        noise = state["noise"][0] * scale**2
        loglik = result.log_likelihood - n_pixels * np.log(scale).sum()
    else:
        lengthscale = state["lengthscale"]
        b = np.diag(state["task_covariance"][:, 0, 0] * scale**2)
        noise = state["noise"][:, 0] * scale**2
        loglik = result.log_likelihood - n_pixels * np.log(scale)
    return {
        "lengthscale_px": lengthscale,
        "task_covariance": b,
        "noise_variance": noise,
        "log_likelihood": np.atleast_1d(loglik),
        "iterations": int(result.n_iterations),
        "converged": bool(result.converged),
        "gradient_norm": float(result.gradient_norm),
        "optimizer_message": result.message,
    }


def _build_outputs(signal, decomposition, fit: _FitOutput, request: _Request, lazy: bool, isotropic: bool):
    nav_axes = hsglue.navigation_axes(signal)
    scales = np.array([a.scale for a in nav_axes])
    hyper = dict(fit.hyperparameters)
    hyper["lengthscale_calibrated"] = hyper["lengthscale_px"] * scales
    hyper["axes_names"] = [str(a.name) for a in nav_axes]
    hyper["axes_units"] = [str(a.units) for a in nav_axes]
    settings = {
        "mode": request.mode,
        "kernel": request.kernel,
        "components": list(decomposition.components),
        "upsampling": request.upsampling,
        "lengthscale_bounds": "None" if request.lengthscale_bounds is None else
        [np.nan if b is None else b for b in request.lengthscale_bounds],
        "isotropic": bool(isotropic),
        "rank": request.rank if request.mode == "parallel" else 0,
        "solver": "kronecker" if request.observed is None else "dense",
        "missing_pixels": 0 if request.observed is None else int((~request.observed).sum()),
    }
    if request.lengthscale_scan is not None:
        settings["lengthscale_bounds_requested"] = "auto"
        settings["lengthscale_scan"] = request.lengthscale_scan.as_dictionary()
    gp_metadata = {"settings": settings, "hyperparameters": hyper, "history": fit.history}
    up_axes = hsglue.upsampled_axis_dicts(nav_axes, request.upsampling)
    loadings = _loadings_signal(signal, fit, up_axes, gp_metadata)
    reconstructed = _spectrum_image(signal, decomposition, fit, up_axes, gp_metadata, lazy)
    return GPReconstruction(reconstructed, loadings, hyper, fit.history)


def _component_axis(n: int) -> dict:
    return {"name": "Decomposition component index", "units": "", "size": n, "navigate": True}


def _loadings_signal(signal, fit: _FitOutput, up_axes, gp_metadata):
    def stack(data, title):
        axes = [_component_axis(data.shape[-1])] + [dict(a, navigate=False) for a in up_axes]
        md = {"General": {"title": title}, "Signal": {"signal_type": ""}}
        return hsglue.build_signal(np.ascontiguousarray(np.moveaxis(data, -1, 0)), axes, md)

    title = signal.metadata.General.title or "signal"
    maps = stack(fit.mean, f"GP loadings of {title}")
    maps.metadata.set_item("Signal.Noise_properties.variance", stack(fit.variance, f"GP loadings variance of {title}"))
    maps.metadata.set_item("GP_reconstruction", gp_metadata)
    return maps


def _spectrum_image(signal, decomposition, fit: _FitOutput, up_axes, gp_metadata, lazy: bool):
    maps, factors, mean = fit.mean, decomposition.factors, decomposition.mean
    data = _lazy_cube(maps, factors, mean) if lazy else _cube_block(maps, factors.T, mean)
    sig_axis = hsglue.axis_dict(signal.axes_manager.signal_axes[0], navigate=False)
    md = hsglue.metadata_dict(signal)
    md.setdefault("General", {})["title"] = f"{signal.metadata.General.title} (GP reconstruction)".strip()
    md.pop("_HyperSpy", None)
    out = hsglue.build_signal(data, up_axes + [sig_axis], md, hsglue.original_metadata_dict(signal), lazy=lazy)
    hsglue.set_learning_results(out, maps.reshape(-1, maps.shape[-1]), factors, mean, decomposition.algorithm)
    out.metadata.set_item("GP_reconstruction", gp_metadata)
    out.metadata.set_item("GP_reconstruction.loadings_variance", np.moveaxis(fit.variance, -1, 0))
    return out


def _lazy_cube(maps: np.ndarray, factors: np.ndarray, mean: np.ndarray | None):
    """``maps @ factors.T (+ mean)`` as a dask array built one navigation chunk per task.

    As HyperSpy's ``get_decomposition_model(lazy_output=True)``: the whole signal axis
    in every chunk, navigation chunks sized by dask's ``array.chunk-size`` setting, so
    computing or saving it holds a few chunks at a time, never the cube.
    """
    import dask.array as da

    dtype = np.result_type(maps, factors, *([] if mean is None else [mean]))
    shape = maps.shape[:-1] + factors.shape[:1]
    chunks = da.core.normalize_chunks(("auto",) * (maps.ndim - 1) + (-1,), shape, dtype=dtype)
    lazy_maps = da.from_array(maps, chunks=chunks[:-1] + (-1,))
    return da.map_blocks(_cube_block, lazy_maps, factors.T, mean, chunks=chunks, dtype=dtype)


def _cube_block(maps: np.ndarray, factors_t: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """Spectra of a block of maps ``(..., T)``: ``maps @ factors_t``, plus the mean."""
    out = maps @ factors_t
    if mean is not None:
        out += mean
    return out
