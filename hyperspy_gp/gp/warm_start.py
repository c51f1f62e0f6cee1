"""Warm start of a fit from a complete grid: the largest rectangle, a central crop, or the filled-in scan.

With missing pixels every likelihood evaluation pays for them (a Schur complement, a
dense factorisation of the observed pixels, or CG over them), up to a minute on a large
scan with a masked region on the CPU, and from the default start the fit spends most
of its evaluations getting near the optimum.  The largest axis-aligned rectangle of
measured pixels is a complete grid, whose likelihood costs what a complete scan's does
(its eigenbasis, or FFT products on the iterative path).  Its optimum, fitted first, is
the same GP's optimum on part of the same data: the fit on all measured pixels starts
there and has little left to do.

Measured on 2 CPU cores (96² × 6 maps, a masked quarter disc, Schur complement by CG):
35 iterations in 100 s from the default start; 8 in 48 s from the start fitted on a
38 × 96 rectangle in 0.5 s, to the same optimum (length scales within 1.3 %, the log
likelihood 0.4 higher).

A rectangle is used when each of its sides spans at least :data:`MIN_SIDE` pixels and
it holds at least :data:`MIN_FRACTION` of the measured pixels; scattered missing
pixels (a sparse scan, dead pixels at random) leave no such rectangle and the fit
starts from the default.

On the iterative path (``kernel="matern"`` beyond 1024 pixels) the rectangle is fitted
on that path too (FFT products and CG, with as many probes).  Measured on 2 CPU
cores (80² × 3 maps, a masked quarter disc): 46 iterations in 76 s from the default
start; 15 in 40 s from the start fitted on the 32 × 80 rectangle in 9 s, to the same
optimum (log likelihood 0.007 lower, length scales within 0.1 %).

A complete scan on the iterative path is started the same way, from the optimum on its
central crop of :data:`CROP_SIDE` pixels per axis (when the scan holds at least
:data:`CROP_FACTOR` times as many pixels): every evaluation of the whole scan costs FFT
products and CG over all of it, about 1.6 s at 128² × 6 maps on 2 CPU cores, and a crop's
about 0.07 s.  Measured there (atomic-resolution EELS, 6 SVD maps): 97 iterations in
181 s from the default start; 33 in 53 s from the start fitted on the 32² crop in 7 s,
to the same optimum (log likelihood 0.09 higher, length scales within 0.3 %).  A larger
crop did not shorten the fit (64²: 33 iterations after 24 s); the dense path on the
crop costs more than the iterative one (34 s at 32²).  Scattered missing pixels on the
iterative path (no rectangle) start from the crop too, fitted with its own missing
pixels: 128² × 3 EELS maps with 5 % missing at random, 63 iterations in 108.5 s from
the default start, 31 in 65.7 s in all from the crop's optimum (log likelihood 0.04
higher); 120 × 90 × 4 with 10 % missing, 102 iterations in 174 s against 66 in 114 s.
The exact masked paths do not start from a crop: on the Schur complement by CG
(separable kernel) the crop's start led the 120 × 90 × 4 fit to another local optimum
of the likelihood, 1457 below the default start's (the factorised exact likelihood at
both points agrees with the estimates to 2).  A start away from the default can do that
on any path; on the iterative one the six cases measured reached the default start's
optimum.  There, for the separable kernel, scattered missing pixels (at most
:data:`MAX_IMPUTED_FRACTION`) are filled in from their neighbours instead and the whole
grid is fitted as complete, in the Kronecker eigenbasis (about a second): all of the
data, so the start is near the optimum.  120 × 90 × 4 EELS maps (separable kernel, fit only): 10 % missing at random,
Schur complement by CG, 85 iterations in 34.3 s from the default start, 33 in 16.4 s
in all from the filled-in grid's optimum (log likelihood 0.05 higher); 2 % missing,
factorised Schur complement, 69 in 38.4 s against 31 in 18.9 s (0.05 higher).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from hyperspy_gp.gp.iterative import CGConvergenceError
from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.model import GridICMModel

_logger = logging.getLogger(__name__)

#: Fewest pixels along each side of a rectangle worth a warm start.
MIN_SIDE = 8
#: Smallest fraction of the measured pixels a rectangle worth a warm start holds.
MIN_FRACTION = 0.25
#: Pixels per axis of the central crop that a scan on the iterative path without a rectangle is fitted on first.
CROP_SIDE = 32
#: A complete scan on the iterative path is warm-started when it holds this many times its crop's pixels.
CROP_FACTOR = 4
#: Fewest length scales per axis a crop spans for its optimum to start a model's fit: a
#: longer one is ill-determined on the crop (smooth maps at 128²: a start fitted with
#: ℓ ≈ 60 px on a 32² crop stopped at a log likelihood 16 below the default start's).
MIN_CROP_LENGTHSCALES = 4.0
#: Smallest fraction of measured pixels in a crop with missing ones worth fitting first.
MIN_CROP_MEASURED = 0.5
#: Largest fraction of missing pixels that the exact masked paths fill in for a start
#: on the complete grid, where no rectangle qualifies.
MAX_IMPUTED_FRACTION = 0.25
#: How the log names each kind of region of :func:`_start_region`.
_REGION_NAMES = {"rectangle": "complete rectangle", "crop": "central crop", "imputed": "filled-in scan"}


@dataclass
class WarmStart:
    """Where a fit started from.

    Attributes
    ----------
    rectangle
        One slice per axis of the fitted grid: the rectangle fitted first (complete,
        a crop with its missing pixels, or the whole grid filled in).
    n_iterations
        Optimiser iterations of that fit.
    n_imputed
        Missing pixels filled in from their neighbours for that fit (the whole grid
        fitted as complete), or 0.
    """

    rectangle: tuple[slice, ...]
    n_iterations: int
    n_imputed: int = 0


def largest_complete_rectangle(observed: np.ndarray) -> tuple[slice, slice] | None:
    """The axis-aligned rectangle of measured pixels with the most pixels.

    The maximal rectangle in a boolean matrix: row by row, the run of measured pixels
    ending there in each column is a histogram whose largest rectangle a stack finds
    in one pass; ``O(ny · nx)`` in all.

    Parameters
    ----------
    observed : numpy.ndarray
        Boolean ``(ny, nx)`` grid, True where a pixel was measured.

    Returns
    -------
    tuple of slice or None
        ``(rows, columns)``, or ``None`` when no pixel was measured.

    Examples
    --------
    >>> observed = np.ones((4, 6), dtype=bool)
    >>> observed[2, 1] = False
    >>> largest_complete_rectangle(observed)
    (slice(0, 4, None), slice(2, 6, None))
    """
    n_rows, n_cols = observed.shape
    heights = np.zeros(n_cols, dtype=int)
    best_area, best = 0, None
    for row in range(n_rows):
        heights = np.where(observed[row], heights + 1, 0)
        stack: list[tuple[int, int]] = []  # (first column, height), heights increasing
        for col, height in enumerate([*heights.tolist(), 0]):
            start = col
            while stack and stack[-1][1] >= height:
                start, top = stack.pop()
                if top * (col - start) > best_area:
                    best_area, best = top * (col - start), (slice(row - top + 1, row + 1), slice(start, col))
            stack.append((start, height))
    return best


def warm_start_rectangle(observed: np.ndarray) -> tuple[slice, ...] | None:
    """The complete rectangle a fit of the measured pixels ``observed`` starts from, if any.

    Parameters
    ----------
    observed : numpy.ndarray
        Boolean grid of the measured pixels (numpy order).

    Returns
    -------
    tuple of slice or None
        The largest complete rectangle when it spans :data:`MIN_SIDE` pixels per side
        and holds :data:`MIN_FRACTION` of the measured pixels; else ``None`` (and for
        grids that are not 2-D).

    Examples
    --------
    >>> observed = np.ones((32, 32), dtype=bool)
    >>> observed[20:, 20:] = False  # a masked corner
    >>> warm_start_rectangle(observed)
    (slice(0, 20, None), slice(0, 32, None))
    >>> warm_start_rectangle(np.random.default_rng(0).random((32, 32)) > 0.2) is None  # scattered
    True
    """
    if observed.ndim != 2:
        return None
    rectangle = largest_complete_rectangle(observed)
    if rectangle is None:
        return None
    sides = [s.stop - s.start for s in rectangle]
    if min(sides) < MIN_SIDE or np.prod(sides) < MIN_FRACTION * observed.sum():
        return None
    return rectangle


def central_crop(grid_shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The central crop a scan on the iterative path is fitted on first, if any.

    Parameters
    ----------
    grid_shape : tuple of int
        The fitted grid (numpy order).

    Returns
    -------
    tuple of slice or None
        At most :data:`CROP_SIDE` pixels per axis, centred; ``None`` when the scan holds
        fewer than :data:`CROP_FACTOR` times the crop's pixels (its own fit costs little
        more) and for grids that are not 2-D.

    Examples
    --------
    >>> central_crop((128, 100))
    (slice(48, 80, None), slice(34, 66, None))
    >>> central_crop((2000, 20))  # a long narrow scan: 32 × 20 pixels
    (slice(984, 1016, None), slice(0, 20, None))
    >>> central_crop((48, 48)) is None  # 2304 pixels, not 4 × 1024
    True
    """
    if len(grid_shape) != 2:
        return None
    sides = [min(n, CROP_SIDE) for n in grid_shape]
    if np.prod(grid_shape) < CROP_FACTOR * np.prod(sides):
        return None
    return tuple(slice((n - side) // 2, (n - side) // 2 + side) for n, side in zip(grid_shape, sides))


def rectangle_model(model: GridICMModel, rectangle: tuple[slice, ...], keep_missing: bool = True) -> GridICMModel:
    """The complete-grid model of ``model`` on ``rectangle`` of its grid (same kernel, bounds and tasks).

    Parameters
    ----------
    model
        A model with missing pixels, or one on the iterative path.
    rectangle
        One slice per axis of its grid: without missing pixels, or (on the iterative
        path) a crop with some.
    keep_missing
        ``False``: a complete grid whatever ``rectangle`` holds (its missing pixels
        filled in by the caller).

    Returns
    -------
    GridICMModel
        At the default start: solved in the eigenbasis, or iteratively (with as many
        probes, and the crop's missing pixels) when ``model`` is.
    """
    kernel = model.kernel
    points = [p[s] - p[s][0] for p, s in zip(kernel.points, rectangle)]
    sub_kernel = GridKernel([len(p) for p in points], kernel.kind, dtype=kernel.dtype, device=kernel.device,
                            points=[p.cpu().numpy() for p in points])
    observed = model.observed[rectangle] if keep_missing and model.observed is not None else None
    observed = None if observed is None or observed.all() else observed
    masked_solver = {} if observed is None else {"masked_solver": model.masked_solver}
    return GridICMModel(sub_kernel, model.n_models, model.n_tasks, rank=model.rank, isotropic=model.isotropic,
                        lengthscale_bounds=model.lengthscale_bounds, observed=observed,
                        iterative=model.iterative, n_probes=model.n_probes, **masked_solver)


def warm_start(
    model: GridICMModel, targets: torch.Tensor, max_iter: int, tol: float, show_progressbar: bool = False
) -> WarmStart | None:
    """Start ``model`` from the optimum on a rectangle of its grid, in place.

    With missing pixels, the largest complete rectangle (:func:`warm_start_rectangle`);
    else, on the iterative path, the :func:`central_crop` (with its missing pixels), and
    on the exact masked paths of the separable kernel the whole grid with its scattered
    missing pixels filled in (:func:`fill_missing`).

    Parameters
    ----------
    model
        The model to fit; its parameters are replaced by the rectangle's fit.
    targets
        ``(P, *grid, T)`` standardised maps (NaN-free: missing pixels hold any value).
    max_iter, tol, show_progressbar
        As for :func:`~hyperspy_gp.gp.training.fit_model`.

    Returns
    -------
    WarmStart or None
        The rectangle, the iterations of its fit and the pixels filled in, or ``None``
        (parameters untouched) when there is no rectangle worth it (a complete grid in
        the Kronecker eigenbasis, whose evaluations cost as little), when a crop spans
        too few of every model's length scales, or when its fit failed.

    Examples
    --------
    >>> yy, xx = np.mgrid[:24, :24]
    >>> maps = torch.tensor(np.sin(xx / 2.0) * np.cos(yy / 3.0))[None, ..., None]
    >>> observed = np.ones((24, 24), dtype=bool)
    >>> observed[16:, 16:] = False
    >>> model = GridICMModel(GridKernel((24, 24)), 1, 1, rank=0, observed=observed, masked_solver="schur")
    >>> warm_start(model, maps, max_iter=1000, tol=1e-9).rectangle
    (slice(0, 16, None), slice(0, 24, None))
    """
    from hyperspy_gp.gp.training import fit_model

    rectangle, kind = _start_region(model)
    if rectangle is None:
        return None
    sub = rectangle_model(model, rectangle, keep_missing=kind != "imputed")
    sub_targets = targets[(slice(None), *rectangle)].contiguous()
    n_imputed = 0
    if kind == "imputed":
        sub_targets = fill_missing(sub_targets, model.observed)
        n_imputed = int((~model.observed).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its convergence is the masked fit's business
        try:
            result = fit_model(sub, sub_targets, max_iter=max_iter, tol=tol, show_progressbar=show_progressbar)
        except (CGConvergenceError, FloatingPointError) as error:
            _logger.info("Warm start on the %s %s failed (%s); default start", _REGION_NAMES[kind], rectangle, error)
            return None
    started = _well_determined(sub) if kind == "crop" else torch.ones(model.n_models, dtype=bool)
    if not started.any():
        _logger.info("Warm start: the crop %s is shorter than %g length scales; default start",
                     rectangle, MIN_CROP_LENGTHSCALES)
        return None
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in sub.named_parameters():
            on_device = started.to(value.device)
            parameters[name][on_device] = value[on_device]
    _logger.info("Warm start: fitted the %s %s (%d pixels filled in) in %d iterations (models %s started there)",
                 _REGION_NAMES[kind], rectangle, n_imputed, result.n_iterations, started.nonzero().ravel().tolist())
    return WarmStart(rectangle, result.n_iterations, n_imputed)


def fill_missing(targets: torch.Tensor, observed: np.ndarray) -> torch.Tensor:
    """``targets`` with each missing pixel the mean of its measured (or filled) 4-neighbours.

    Pixels next to a measured one are filled first, then their neighbours, until none
    is left: a start for the fit, not an estimate of the maps.

    Parameters
    ----------
    targets
        ``(P, ny, nx, T)``.
    observed
        Boolean ``(ny, nx)``, True where a pixel was measured.

    Returns
    -------
    torch.Tensor
        A copy, the measured pixels unchanged.

    Examples
    --------
    >>> maps = torch.arange(9.0).reshape(1, 3, 3, 1)
    >>> observed = np.ones((3, 3), dtype=bool)
    >>> observed[1, 1] = False
    >>> float(fill_missing(maps, observed)[0, 1, 1, 0])  # (1 + 3 + 5 + 7) / 4
    4.0
    """
    values = targets.detach().cpu().numpy().copy()
    known = observed.copy()
    while not known.all():
        sums, counts = np.zeros_like(values), np.zeros(known.shape)
        for axis in (0, 1):
            for step in (1, -1):
                shifted = np.roll(known, step, axis=axis)
                edge = [slice(None)] * 2
                edge[axis] = 0 if step == 1 else -1
                shifted[tuple(edge)] = False  # no wrap-around
                neighbour = np.roll(values, step, axis=axis + 1)
                sums += np.where(shifted[None, ..., None], neighbour, 0.0)
                counts += shifted
        fill = ~known & (counts > 0)
        values[:, fill] = sums[:, fill] / counts[fill][None, :, None]
        known |= fill
    return torch.as_tensor(values, dtype=targets.dtype, device=targets.device)


def _start_region(model: GridICMModel) -> tuple[tuple[slice, ...] | None, str]:
    """The rectangle ``model`` is first fitted on, if any, and how: ``"rectangle"``, ``"crop"`` or ``"imputed"``.

    The largest complete rectangle of a model with missing pixels.  Else, on the
    iterative path, the :func:`central_crop` (with its missing pixels, when it holds at
    least :data:`MIN_CROP_MEASURED` measured ones); on the exact masked paths of the
    separable kernel, the whole grid with its missing pixels filled in
    (:func:`fill_missing`, at most :data:`MAX_IMPUTED_FRACTION` of them), fitted as
    complete in the Kronecker eigenbasis (the Matérn kernel's dense eigendecomposition
    costs a complete grid as much as the masked fit's evaluations).
    (A crop's start led a Schur-CG fit to another local optimum, 1457 below the default
    start's log likelihood, 120 × 90 × 4 at 10 % missing.)
    """
    grid = model.kernel.grid_shape
    if model.observed is not None:
        rectangle = warm_start_rectangle(model.observed)
        if rectangle is not None:
            return rectangle, "rectangle"
    if not model.iterative:
        imputed = model.observed is not None and model.kernel.kind == "separable" and len(grid) == 2 and \
            (~model.observed).mean() <= MAX_IMPUTED_FRACTION
        return (tuple(slice(0, n) for n in grid) if imputed else None), "imputed"
    crop = central_crop(grid)
    if crop is not None and model.observed is not None and model.observed[crop].mean() < MIN_CROP_MEASURED:
        return None, "crop"
    return crop, "crop"


def _well_determined(sub: GridICMModel) -> torch.Tensor:
    """``(P,)``: True where the crop spans :data:`MIN_CROP_LENGTHSCALES` of the model's length scales per axis."""
    extent = torch.stack([p[-1] - p[0] + 1 for p in sub.kernel.points]).to(sub.lengthscale)
    return (sub.lengthscale.detach() * MIN_CROP_LENGTHSCALES <= extent).all(dim=-1).cpu()
