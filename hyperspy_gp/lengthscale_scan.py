"""Length-scale scan: find the basins of the marginal likelihood and bounds from them.

An unconstrained GP fit of a noisy atomic-resolution map often converges to a long
length scale that smooths the atomic contrast away, although the likelihood also has
a local optimum (a *basin*) at the atomic length scale.  The scan makes those basins
visible: for each loading map an independent GP is fitted with the upper length-scale
bound raised step by step (``1 … 30`` px by default), each fit starting from the
length scale the previous one converged to, so that a curve stays in the basin it
has found rather than jumping between optima.  While the data want a longer length scale than
allowed, the converged length scale sits on the bound (the curve follows the
diagonal); where it stops following the bound and stays put as the bound keeps
rising, the fit has found a basin.  The finest basin found becomes the suggested
``lengthscale_bounds`` of :func:`hyperspy_gp.gp_reconstruct`
(``lengthscale_bounds="auto"`` runs the scan and uses it).

Parallelism: the bounds must be visited in order (each fit starts from the previous
one), the maps need not.  The maps are split into groups of ``batch_size`` that run
as separate dask tasks on the current scheduler (threads, or the workers of a
``dask.distributed`` client); within a task every map still gets its own optimiser
run (:func:`~hyperspy_gp.gp.training.fit_model`), so the grouping changes where the
work runs, never the result.  The default is one map per task.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hyperspy_gp import _hyperspy as hsglue
from hyperspy_gp.maps_gp import standardise

_logger = logging.getLogger(__name__)

__all__ = ["LengthscaleScan", "lengthscale_scan", "scan_loading_maps", "find_basins", "suggest_bounds"]

#: Default largest upper bound (pixels), capped at the largest scan dimension.
DEFAULT_LARGEST_BOUND = 30.0
#: Default number of upper bounds, spaced geometrically from 1 px.
DEFAULT_N_BOUNDS = 12
#: A converged length scale above this fraction of its upper bound is "on the bound".
DIAGONAL_RATIO = 0.95
#: Relative spread of the length scale that still counts as the same plateau.
PLATEAU_TOLERANCE = 0.2
#: Consecutive bounds over which a length scale must stay put to count as a basin.
MIN_PLATEAU = 2
#: Suggested bounds are ``(basin / margin, basin · margin)``.
DEFAULT_MARGIN = 1.5
#: Maps whose GP attributes less than this fraction of their variance to spatial
#: signal (the rest to noise) do not set the suggested bounds: noise pulls the
#: fitted length scale down, so their basins are biased short.
MIN_SIGNAL_FRACTION = 0.5
#: A plateau below this multiple of the lower bound is the fit pinned to that bound
#: (the map looks like white noise at this sampling), not a basin.
PINNED_RATIO = 1.2


@dataclass
class LengthscaleScan:
    """Converged length scales of independent GP fits against their upper bound.

    Attributes
    ----------
    upper_bounds
        The upper length-scale bounds visited, ``(K,)`` pixels, increasing.
    lengthscales
        Converged length scales, ``(K, T, ndim)`` pixels: bound × map × scan axis
        (numpy axis order; ``ndim = 1`` when isotropic).
    log_likelihood
        Exact log marginal likelihood of each standardised map at each bound, ``(K, T)``.
    converged
        Whether the fit at each bound met its tolerance, ``(K,)``.
    signal_fraction
        Fraction of each standardised map's variance the fit attributes to spatial
        signal, ``B / (B + σ²)``, at each bound, ``(K, T)``.
    lower_bound
        The fixed lower length-scale bound of every fit (pixels).
    components
        Decomposition component index of each map.
    axes_names
        Name of each scan axis of ``lengthscales``.
    basins
        Length scale of the finest basin of each map and axis, ``(T, ndim)`` pixels,
        NaN where the curve never leaves the bound (see :func:`find_basins`).
    suggestion
        ``(lo, hi)`` pixels bracketing the finest basin of the maps whose signal
        fraction at the largest bound is at least 0.5 (of all maps if none is; see
        :func:`suggest_bounds`), ready for ``gp_reconstruct(lengthscale_bounds=...)``;
        ``None`` when no curve has a basin.

    Examples
    --------
    >>> from hyperspy_gp.synthetic import similarity_maps
    >>> maps = similarity_maps((12, 12), period=(6.0, 6.0))[:1].transpose(1, 2, 0)
    >>> scan = scan_loading_maps(maps, upper_bounds=[1.0, 2.0, 4.0])
    >>> scan.upper_bounds.shape, scan.lengthscales.shape, scan.basins.shape
    ((3,), (3, 1, 2), (1, 2))
    """

    upper_bounds: np.ndarray
    lengthscales: np.ndarray
    log_likelihood: np.ndarray
    converged: np.ndarray
    signal_fraction: np.ndarray
    lower_bound: float
    components: list[int]
    axes_names: list[str]
    basins: np.ndarray
    suggestion: tuple[float, float] | None

    def plot(self, ax=None):
        """Plot converged length scale against upper bound, one colour per component.

        The dashed diagonal is ``length scale = bound``; the suggested bounds are
        shaded.  Solid and dotted lines are the first and second scan axes; maps the
        fit finds noise-dominated (signal fraction < 0.5) are faded.

        Parameters
        ----------
        ax : matplotlib.axes.Axes, optional
            Axes to draw in; default a new figure.

        Returns
        -------
        matplotlib.figure.Figure

        Examples
        --------
        >>> import matplotlib.pyplot as plt
        >>> from hyperspy_gp.synthetic import similarity_maps
        >>> maps = similarity_maps((12, 12), period=(6.0, 6.0))[:1].transpose(1, 2, 0)
        >>> fig = scan_loading_maps(maps, upper_bounds=[1.0, 2.0, 4.0]).plot()
        >>> len(fig.axes[0].lines)  # diagonal + 2 axes
        3
        >>> plt.close(fig)
        """
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D

        fig, ax = plt.subplots(figsize=(8.0, 4.5), layout="constrained") if ax is None else (ax.figure, ax)
        bounds = self.upper_bounds
        ax.plot(bounds, bounds, "--", color="0.3", lw=1, label="length scale = bound")
        if self.suggestion is not None:
            lo, hi = self.suggestion
            ax.axhspan(lo, hi, color="tab:green", alpha=0.15, label=f"suggested bounds [{lo:.3g}, {hi:.3g}] px")
        styles = ("-", ":")
        for t, component in enumerate(self.components):
            noisy = self.signal_fraction[-1, t] < MIN_SIGNAL_FRACTION
            label = f"component {component}" + (" (noise-dominated)" if noisy else "")
            for d in range(self.lengthscales.shape[-1]):
                ax.plot(bounds, self.lengthscales[:, t, d], linestyle=styles[d % 2], marker="o", ms=3,
                        color=f"C{t % 10}", alpha=0.35 if noisy else 1.0, label=label if d == 0 else None)
        handles, labels = ax.get_legend_handles_labels()
        if self.lengthscales.shape[-1] > 1:
            for d, name in enumerate(self.axes_names):
                handles.append(Line2D([], [], color="0.4", linestyle=styles[d % 2]))
                labels.append(f"axis {name}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("upper length-scale bound (px)")
        ax.set_ylabel("converged length scale (px)")
        ax.set_title("Length-scale scan")
        ax.legend(handles, labels, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
        return fig

    def as_dictionary(self) -> dict:
        """The scan as plain values for a signal's metadata (``"None"`` for no suggestion).

        Returns
        -------
        dict
            Arrays, numbers, lists and strings only, as HyperSpy metadata stores them.

        Examples
        --------
        >>> from hyperspy_gp.synthetic import similarity_maps
        >>> maps = similarity_maps((12, 12), period=(6.0, 6.0))[:1].transpose(1, 2, 0)
        >>> sorted(scan_loading_maps(maps, upper_bounds=[1.0, 2.0]).as_dictionary())[:3]
        ['axes_names', 'basins_px', 'components']
        """
        return {
            "upper_bounds_px": np.asarray(self.upper_bounds),
            "lengthscales_px": np.asarray(self.lengthscales),
            "log_likelihood": np.asarray(self.log_likelihood),
            "converged": np.asarray(self.converged),
            "signal_fraction": np.asarray(self.signal_fraction),
            "lower_bound_px": float(self.lower_bound),
            "components": list(self.components),
            "axes_names": list(self.axes_names),
            "basins_px": np.asarray(self.basins),
            "suggestion": "None" if self.suggestion is None else list(self.suggestion),
        }


def lengthscale_scan(
    signal,
    components: int | Sequence[int] | None = None,
    upper_bounds: Sequence[float] | None = None,
    lower_bound: float | None = None,
    isotropic: bool = False,
    kernel: str = "separable",
    margin: float = DEFAULT_MARGIN,
    batch_size: int | None = 1,
    max_iter: int = 1000,
    tol: float = 1e-6,
    device: str = "cpu",
    dtype: str = "float64",
    show_progressbar: bool | None = None,
) -> LengthscaleScan:
    """Scan the upper length-scale bound of independent GPs on decomposition loading maps.

    Parameters
    ----------
    signal : :class:`~hyperspy.api.signals.Signal1D`
        Spectrum image (or line scan) with decomposition results; not modified.
    components : int, list of int or None
        As in :func:`hyperspy_gp.gp_reconstruct`.
    upper_bounds : sequence of float, optional
        Upper bounds (pixels) to visit, in increasing order.  Default: 12 values
        spaced geometrically from 1 px to 30 px (or the largest scan dimension).
    lower_bound : float, optional
        Fixed lower length-scale bound (pixels); default 0.5 px.
    isotropic : bool
        One length scale for both scan axes.
    kernel : {"separable", "matern"}
        Spatial kernel, as in :func:`hyperspy_gp.gp_reconstruct`.
    margin : float
        The suggestion is ``(basin / margin, basin · margin)``; must be > 1.
    batch_size : int or None
        Maps per dask task; ``None`` puts all maps in one task.  The result does not
        depend on it (see the module docstring).
    max_iter, tol : int, float
        Iteration cap and relative tolerance of each fit.
    device, dtype : str
        Torch device and precision.
    show_progressbar : bool or None
        Show one tick per bound; ``None`` follows HyperSpy's preference.

    Returns
    -------
    LengthscaleScan
        Curves, basins and the suggested ``lengthscale_bounds``; ``.plot()`` draws them.

    Raises
    ------
    ValueError
        For the bad inputs :func:`hyperspy_gp.gp_reconstruct` refuses, and for invalid
        bounds, margin or batch size.

    Examples
    --------
    >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
    >>> s = atomic_eels_spectrum_image(shape=(12, 12), n_channels=32, seed=0)
    >>> s.decomposition(output_dimension=2, print_info=False)
    >>> scan = lengthscale_scan(s, components=1, upper_bounds=[1.0, 2.0, 4.0])
    >>> scan.lengthscales.shape  # bounds × maps × axes
    (3, 1, 2)
    """
    from hyperspy_gp.request import check_maps, choose_solver, validate_request

    request = validate_request(
        signal, components, "independent", 1, None, kernel, 0, "auto", device, dtype, None
    )
    grid = hsglue.navigation_shape(signal)
    upper_bounds, lower_bound = _check_scan_options(upper_bounds, lower_bound, margin, batch_size, grid)
    maps = check_maps(hsglue.read_decomposition(signal, request.components).maps, request.components)
    observed = choose_solver(maps, request)  # also settles request.solver and request.lines
    return scan_loading_maps(
        request.fitted_region(maps),
        points=request.fitted_coordinates(grid)[1],
        upper_bounds=upper_bounds,
        lower_bound=lower_bound,
        components=request.components,
        observed=observed,
        masked_solver=request.masked_solver,
        iterative=request.iterative,
        axes_names=[str(a.name) for a in hsglue.navigation_axes(signal)],
        isotropic=isotropic,
        kernel=kernel,
        margin=margin,
        batch_size=batch_size,
        max_iter=max_iter,
        tol=tol,
        device=device,
        dtype=dtype,
        show_progressbar=hsglue.resolve_show_progressbar(show_progressbar),
    )


def scan_loading_maps(
    maps: np.ndarray,
    upper_bounds: Sequence[float] | None = None,
    lower_bound: float | None = None,
    components: Sequence[int] | None = None,
    observed: np.ndarray | None = None,
    masked_solver: str = "schur",
    iterative: bool = False,
    points: Sequence[np.ndarray] | None = None,
    axes_names: Sequence[str] | None = None,
    isotropic: bool = False,
    kernel: str = "separable",
    margin: float = DEFAULT_MARGIN,
    batch_size: int | None = 1,
    max_iter: int = 1000,
    tol: float = 1e-6,
    device: str = "cpu",
    dtype: str = "float64",
    show_progressbar: bool = False,
) -> LengthscaleScan:
    """The length-scale scan of :func:`lengthscale_scan` on plain arrays.

    Parameters
    ----------
    maps : ndarray
        Loading maps ``(*grid, T)``, numpy order; NaN marks a missing pixel.
    observed : ndarray of bool, optional
        Measured pixels when some are missing; ``None`` for a complete grid.
    masked_solver : {"schur", "schur-cg", "dense", "iterative"}
        Exact path for missing pixels (see :class:`~hyperspy_gp.gp.model.GridICMModel`).
    iterative : bool
        Fit by conjugate gradients and a stochastic log-determinant
        (:mod:`~hyperspy_gp.gp.iterative`), for ``kernel="matern"`` on large grids;
        missing pixels are then served by CG on the observed values
        (:mod:`~hyperspy_gp.gp.iterative_missing`) whatever ``masked_solver``.
    points : sequence of ndarray, optional
        Coordinates (pixels) of the maps' lines per axis, when they are not
        ``0, 1, ..., n - 1`` (scan lines without data left out, see
        :meth:`~hyperspy_gp.request.Request.fitted_coordinates`).
    components, axes_names : sequence, optional
        Labels of the maps and of the scan axes; default ``0..T-1`` and numpy axes.
    upper_bounds, lower_bound, isotropic, kernel, margin, batch_size, max_iter, tol, device, dtype
        See :func:`lengthscale_scan`.
    show_progressbar : bool
        One tick per bound (one map per task: dask's progress over the tasks).

    Returns
    -------
    LengthscaleScan

    Examples
    --------
    >>> from hyperspy_gp.synthetic import similarity_maps
    >>> maps = similarity_maps((12, 12), period=(6.0, 6.0))[:2].transpose(1, 2, 0)
    >>> scan = scan_loading_maps(maps, upper_bounds=[1.0, 2.0, 4.0])
    >>> scan.lengthscales.shape, bool((scan.lengthscales <= 4.0).all())
    ((3, 2, 2), True)
    """
    maps = np.asarray(maps, dtype=np.float64)
    grid, n_maps = maps.shape[:-1], maps.shape[-1]
    upper_bounds, lower_bound = _check_scan_options(upper_bounds, lower_bound, margin, batch_size, grid)
    standardised = np.moveaxis(standardise(maps)[0], -1, 0)[..., None]  # (T, *grid, 1)
    size = n_maps if batch_size is None else int(batch_size)
    groups = [standardised[i : i + size] for i in range(0, n_maps, size)]
    options = dict(upper_bounds=upper_bounds, lower_bound=lower_bound, observed=observed,
                   masked_solver=masked_solver, iterative=iterative, points=points,
                   isotropic=isotropic, kernel=kernel, max_iter=max_iter, tol=tol, device=device, dtype=dtype)
    if len(groups) == 1:
        sweeps = [_sweep(groups[0], show_progressbar=show_progressbar, **options)]
    else:
        import dask

        tasks = [dask.delayed(_sweep, pure=True)(g, show_progressbar=False, **options) for g in groups]
        with hsglue.dask_progressbar(show_progressbar):
            sweeps = dask.compute(*tasks)
    lengthscales = np.concatenate([s[0] for s in sweeps], axis=1)
    signal_fraction = np.concatenate([s[3] for s in sweeps], axis=1)
    basins = find_basins(upper_bounds, lengthscales, lower_bound=lower_bound)
    reliable = np.broadcast_to((signal_fraction[-1] >= MIN_SIGNAL_FRACTION)[:, None], basins.shape)
    return LengthscaleScan(
        upper_bounds=upper_bounds,
        lengthscales=lengthscales,
        log_likelihood=np.concatenate([s[1] for s in sweeps], axis=1),
        converged=np.all([s[2] for s in sweeps], axis=0),
        signal_fraction=signal_fraction,
        lower_bound=lower_bound,
        components=list(range(n_maps)) if components is None else [int(c) for c in components],
        axes_names=[f"axis {a}" for a in range(len(grid))] if axes_names is None else list(axes_names),
        basins=basins,
        suggestion=suggest_bounds(basins, margin=margin, lower_limit=lower_bound, reliable=reliable),
    )


def find_basins(
    upper_bounds: np.ndarray,
    lengthscales: np.ndarray,
    diagonal_ratio: float = DIAGONAL_RATIO,
    tolerance: float = PLATEAU_TOLERANCE,
    min_plateau: int = MIN_PLATEAU,
    lower_bound: float | None = None,
) -> np.ndarray:
    """Length scale of the first plateau of each curve of a scan.

    A curve leaves the diagonal at the first bound where its length scale is below
    ``diagonal_ratio × bound``; it has a basin there if the length scale then stays
    within ``±tolerance`` (relative) for at least ``min_plateau`` consecutive bounds.
    The basin's length scale is the median over that plateau.  A plateau within
    ``PINNED_RATIO`` (1.2) of ``lower_bound`` is the fit pinned to that bound, not a
    basin.

    Parameters
    ----------
    upper_bounds : ndarray
        ``(K,)`` increasing bounds.
    lengthscales : ndarray
        ``(K, ...)`` converged length scales.
    diagonal_ratio : float
        A length scale above ``diagonal_ratio × bound`` is still on the bound.
    tolerance : float
        Relative spread of the length scale that still counts as one plateau.
    min_plateau : int
        Consecutive bounds the length scale must stay put over to count as a basin.
    lower_bound : float, optional
        The scan's lower length-scale bound (pixels).

    Returns
    -------
    ndarray
        ``lengthscales.shape[1:]``; NaN for curves without a basin.

    Examples
    --------
    >>> bounds = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    >>> curves = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 4.0], [3.1, 8.0], [3.0, 16.0]])
    >>> find_basins(bounds, curves)
    array([ 3., nan])
    >>> find_basins(bounds, np.full((5, 1), 0.5), lower_bound=0.5)  # pinned
    array([nan])
    """
    bounds = np.asarray(upper_bounds, dtype=float)
    ls = np.asarray(lengthscales, dtype=float)
    curves = ls.reshape(len(bounds), -1)
    floor = 0.0 if lower_bound is None else PINNED_RATIO * float(lower_bound)
    basins = np.full(curves.shape[1], np.nan)
    for c in range(curves.shape[1]):
        basins[c] = _first_plateau(curves[:, c], bounds, diagonal_ratio, tolerance, min_plateau, floor)
    return basins.reshape(ls.shape[1:])


def _first_plateau(curve, bounds, diagonal_ratio, tolerance, min_plateau, floor) -> float:
    for start in np.nonzero(curve < diagonal_ratio * bounds)[0]:
        stop = start + 1
        while stop < len(curve) and abs(curve[stop] / curve[start] - 1.0) <= tolerance:
            stop += 1
        value = float(np.median(curve[start:stop]))
        if stop - start >= min_plateau and value > floor:
            return value
    return math.nan


def suggest_bounds(
    basins: np.ndarray,
    margin: float = DEFAULT_MARGIN,
    lower_limit: float | None = None,
    reliable: np.ndarray | None = None,
) -> tuple[float, float] | None:
    """Length-scale bounds bracketing the finest basin of a scan.

    Basins are grouped from the smallest up, a basin joining the group while it is
    within a factor ``margin`` of the previous one: the first group is the finest
    basin (e.g. the atomic contrast, seen by several maps and axes at slightly
    different length scales, the noisier maps lower).  The bounds are its smallest
    length scale divided by ``margin`` and its largest multiplied by it, rounded to
    three significant figures.

    Parameters
    ----------
    basins : ndarray
        Basin length scales, NaN where a curve has none (see :func:`find_basins`).
    margin : float
        Factor (> 1) between a basin and the bounds around it.
    lower_limit : float, optional
        Smallest allowed lower bound (the scan's own lower bound).
    reliable : ndarray of bool, optional
        Shaped like ``basins``: only these basins count, unless none of them is a
        basin.

    Returns
    -------
    (float, float) or None
        ``None`` when there is no basin.

    Examples
    --------
    >>> suggest_bounds(np.array([[3.0, 3.6], [np.nan, 11.0]]))
    (2.0, 5.4)
    """
    found = np.asarray(basins, dtype=float)
    if reliable is not None and np.isfinite(found[np.asarray(reliable, dtype=bool)]).any():
        found = found[np.asarray(reliable, dtype=bool)]
    found = np.sort(found[np.isfinite(found)])
    if found.size == 0:
        return None
    gaps = np.nonzero(found[1:] > found[:-1] * margin)[0]
    finest = found[: gaps[0] + 1] if gaps.size else found
    lo = float(f"{finest.min() / margin:.3g}")
    hi = float(f"{finest.max() * margin:.3g}")
    if lower_limit is not None:
        lo = max(lo, float(lower_limit))
    return lo, hi


def default_upper_bounds(grid_shape: Sequence[int]) -> np.ndarray:
    """``DEFAULT_N_BOUNDS`` bounds from 1 px to 30 px or the largest scan dimension.

    Examples
    --------
    >>> default_upper_bounds((64, 64))[[0, -1]]
    array([ 1., 30.])
    """
    top = min(DEFAULT_LARGEST_BOUND, float(max(grid_shape)))
    return np.geomspace(1.0, max(top, 2.0), DEFAULT_N_BOUNDS)


def _check_scan_options(upper_bounds, lower_bound, margin, batch_size, grid) -> tuple[np.ndarray, float]:
    from hyperspy_gp.gp.model import MIN_LENGTHSCALE

    lower = MIN_LENGTHSCALE if lower_bound is None else lower_bound
    if isinstance(lower, bool) or not isinstance(lower, (int, float, np.number)) or not (np.isfinite(lower) and lower > 0):
        raise ValueError(f"lower_bound must be a positive number of pixels or None, not {lower_bound!r}.")
    if upper_bounds is None:
        bounds = default_upper_bounds(grid)
    else:
        try:
            bounds = np.asarray(upper_bounds, dtype=float).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"upper_bounds must be a sequence of numbers (pixels), not {upper_bounds!r}.") from None
        if bounds.size == 0 or not np.all(np.isfinite(bounds)):
            raise ValueError(f"upper_bounds must be a non-empty sequence of finite numbers, not {upper_bounds!r}.")
        if np.any(np.diff(bounds) <= 0):
            raise ValueError(f"upper_bounds must be strictly increasing (each fit starts from the previous): {bounds}.")
    if bounds[0] <= lower:
        raise ValueError(f"Every upper bound must exceed the lower bound {lower} px; the smallest is {bounds[0]}.")
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.number)) or not margin > 1:
        raise ValueError(f"margin must be a number > 1, not {margin!r}.")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive number of maps or None, not {batch_size!r}.")
    return bounds, float(lower)


def _sweep(targets, upper_bounds, lower_bound, observed, masked_solver, iterative, points, isotropic, kernel,
           max_iter, tol, device, dtype, show_progressbar):
    """Fit ``(P, *grid, 1)`` maps at each upper bound, warm-starting each fit from the last."""
    import torch
    from tqdm.auto import tqdm

    from hyperspy_gp.gp.kernels import GridKernel
    from hyperspy_gp.gp.model import GridICMModel
    from hyperspy_gp.gp.training import fit_model
    from hyperspy_gp.memory import explain_gpu_out_of_memory

    torch_dtype = getattr(torch, dtype)
    grid_kernel = GridKernel(targets.shape[1:-1], kernel, dtype=torch_dtype, device=device, points=points)
    targets_t = torch.as_tensor(np.ascontiguousarray(targets), dtype=torch_dtype, device=device)
    lengthscales, logliks, converged, fractions, previous = [], [], [], [], None
    with tqdm(total=len(upper_bounds), desc="Length-scale scan", unit="bound",
              disable=not show_progressbar) as progress:
        for hi in upper_bounds:
            model = GridICMModel(grid_kernel, targets.shape[0], 1, rank=0, isotropic=isotropic,
                                 lengthscale_bounds=(lower_bound, float(hi)), observed=observed,
                                 masked_solver=masked_solver, iterative=iterative)
            if previous is not None:
                _warm_start(model, previous, lower_bound, float(hi))
            with explain_gpu_out_of_memory():
                result = fit_model(model, targets_t, max_iter=max_iter, tol=tol)
            previous = model.lengthscale.detach().clone()
            lengthscales.append(previous[:, : model.raw_lengthscale.shape[-1]].cpu().numpy())
            logliks.append(result.log_likelihood)
            converged.append(result.converged)
            signal = torch.diagonal(model.task_covariance, dim1=-2, dim2=-1)[:, 0]
            fractions.append((signal / (signal + model.noise[:, 0])).detach().cpu().numpy())
            progress.update(1)
    return np.stack(lengthscales), np.stack(logliks), np.array(converged), np.stack(fractions)


def _warm_start(model, previous, lo: float, hi: float) -> None:
    """Start ``model``'s length scales at the previous bound's, clamped into ``(lo, hi)``.

    Noise and output scale restart from the model's default: at bounds far below the
    data's length scale the optimum is degenerate (noise at its floor, the GP
    interpolating the noise), and carrying that noise over traps the later fits in
    that optimum (measured on the tests' maps: log likelihood -47 instead of +406).
    """
    import torch

    margin = 1e-3 * (hi - lo)
    with torch.no_grad():
        n_ls = model.raw_lengthscale.shape[-1]
        ls = previous[:, :n_ls].clamp(lo + margin, hi - margin)
        model.raw_lengthscale.copy_(model.raw_lengthscale_constraint.inverse_transform(ls))
