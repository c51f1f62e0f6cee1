r"""The iterative path's exact variance: the periodic twin's inside the scan, windows near its edges.

The iterative path's variance is that of its *periodic twin* (:mod:`~hyperspy_gp.gp.periodic_twin`),
exact by FFT, plus the mean square of a gap that vanishes more than a few length
scales from the scan's edges and from every missing pixel
(:mod:`~hyperspy_gp.gp.iterative_prediction`).  Here that gap is not estimated:

* At a test point whose nearest training pixel has a box of ``m_a = ⌈WINDOW_LENGTHSCALES
  · ℓ_a⌉ + 1`` pixels per side inside the scan and measured throughout (a *clean*
  pixel; the extra pixel because a test point lies up to half a pixel from its
  nearest), the twin's data differ from the model's only beyond that box, and the
  twin's variance is the model's up to their weight there, about the square of the
  kernel's decay.
* Every other test point gets the exact variance of the same model conditioned on the
  measured pixels of a *window*, its core plus ``m_a`` pixels per side
  (:func:`~hyperspy_gp.gp.schur_windows.cut_windows`), the same truncation.  In the
  whitened maps of :func:`~hyperspy_gp.gp.likelihood.whiten_tasks` (``U = √D R``) the
  data are independent with covariance ``γ_k K_OO + I``, so

  .. math::  \mathrm{Var}(f_t(x_*) \mid O) = \sum_k U_{tk}^2 γ_k
      \left[k(0) − γ_k\, k_{*O}^\top (γ_k K_{OO} + I)^{-1} k_{*O}\right],

  one Cholesky factor per whitened map and window (``|O|³ / 3``) and a triangular
  solve with the core's test points (``|O|² m``), in float64, with any stationary
  kernel.

The model is translation invariant, so away from the corners and missing pixels a
test point's variance depends only on its distance to the nearest edge and its
offset from its nearest pixel: one strip window serves a whole edge, one window each
corner; and it is symmetric under the reflection of each axis, so one window serves
both ends of an axis (:func:`edge_windows`: 3 on a complete 2-D scan, whatever its
size: the four corners, the low and high rows, the low and high columns).  Test points
with a missing pixel within the margin, a margin inside the scan (:func:`plan_exact_variance`),
get the twin's variance plus its Schur increase over the missing pixels
(:meth:`~hyperspy_gp.gp.periodic_twin.PeriodicTwin.missing_increase`); those also near
an edge get the windows of their cores, of which only one per group of equal windows
is computed (:func:`distinct_windows`).  Where their
cost exceeds :data:`WINDOWS_OVER_DRAWS` times the draws' (estimated; under
:data:`WINDOWS_ALWAYS_AFFORDABLE` they always serve), or
:func:`~hyperspy_gp.memory.increase_cost_limit` (long length scales, many scattered
missing pixels), or a window exceeds :data:`~hyperspy_gp.memory.MAX_VARIANCE_WINDOW_SQUARED`
measured pixels squared (or the missing pixels of the twin's increase
:data:`~hyperspy_gp.memory.MAX_WINDOW_MISSING_SQUARED`), the iterative posterior tries
shorter margins, whose variance is within a stated bound (:data:`MARGIN_ERROR_BOUNDS`,
:func:`error_bounds`), and draws its variance where none is affordable.

Accuracy against dense algebra (Matérn-5/2, 2× upsampling, 40² and 24 × 20 scans,
length scales 0.6–1.5 px, noise 1e-4 to 0.05 of the prior, complete, a cluster of
missing pixels, 10 % and 30 % missing at random, two models): at most 1.6e-7 of any
pixel's variance (1.4e-6 with a margin of ``⌈6 ℓ⌉``); 32 px on a 12 × 10 scan, where
the variance is 10⁻⁷ of the prior, within 1e-6 too (tested).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hyperspy_gp import memory
from hyperspy_gp.gp.kernels import GridKernel, grid_points
from hyperspy_gp.gp.likelihood import whiten_tasks
from hyperspy_gp.gp.periodic_twin import tile_cosets
from hyperspy_gp.gp.schur_windows import WINDOW_LENGTHSCALES, Window, cut_windows, margins, nearest_pixels

#: Test points per triangular solve of a window (its right-hand sides), and rows per
#: block of its Gram matrix: the kernel's temporaries stay a few times ``|O| × block``.
TEST_BLOCK = memory.WINDOW_BLOCK
#: Margins of the windows, in length scales, tried in turn: the first whose windows are
#: affordable serves (:class:`~hyperspy_gp.gp.iterative_prediction.IterativePosterior`),
#: each with the bound on the relative error of every pixel's variance stated here.
#: The full margin is exact within the equivalence tolerance (1e-6); the shorter ones
#: are an approximation, about ten times coarser per length scale less, that still
#: beats the Monte-Carlo estimate they replace (a few per cent near the edges with 64
#: draws) and costs about ``(c / 6)^6`` of the full margin's windows.  Measured against
#: the same model conditioned on every pixel, largest relative error of any pixel's
#: variance (Matérn-5/2, 2× and 3×, 44 × 40 and 64 × 60 scans, ℓ = 1–3 px, noise 1e-4
#: to 0.3 of the prior; complete, clusters of missing pixels inside and at an edge, 10 %
#: missing at random): at 6 length scales 1.7e-7, at 5 1.5e-6, at 4 1.4e-5, at 3
#: 1.2e-4, at 2 1.1e-3 (largest at ℓ = 1 px, 100 to 1000 times smaller at 3 px: see
#: :data:`LONG_LENGTHSCALE_FACTORS`).  The
#: shorter windows see less data, so their variance errs upwards, the periodic twin's
#: beyond them downwards.
MARGIN_ERROR_BOUNDS = {WINDOW_LENGTHSCALES: 1e-6, 5.0: 1e-5, 4.0: 1e-4, 3.0: 1e-3, 2.0: 1e-2}
#: ``(shortest length scale in pixels, factor)``: with every length scale of every model
#: at least that long, the bounds of :data:`MARGIN_ERROR_BOUNDS` shrink by that factor
#: (:func:`margin_error_bound`).  The error falls with the pixels per length scale:
#: measured as above at noise 1e-4 and 1e-3 of the prior, 2× (64 × 60 and 80 × 72
#: scans; complete, a cluster of missing pixels at an edge, 10 % missing at random),
#: with the shortest length scale 3 px the largest errors were 7.8e-5 at 2 length
#: scales, 5.4e-7 at 3 and 2.0e-8 at 4; with 4 px, 5.5e-6, 1.0e-8 and 5.2e-11; with
#: 6.5 px, 4.3e-8 at 2.
LONG_LENGTHSCALE_FACTORS = ((4.0, 1e-2), (3.0, 1e-1))


def margin_error_bound(lengthscales: float, lengthscale: torch.Tensor) -> float:
    """The bound on the relative error of the variance with windows of ``lengthscales`` for these length scales.

    :data:`MARGIN_ERROR_BOUNDS`, shrunk by :data:`LONG_LENGTHSCALE_FACTORS` where the
    shortest of ``lengthscale`` (``(P, d)``, pixels) is long enough.
    """
    shortest = float(lengthscale.detach().min())
    factor = next((f for ell, f in LONG_LENGTHSCALE_FACTORS if shortest >= ell), 1.0)
    return MARGIN_ERROR_BOUNDS[lengthscales] * factor


def clean_pixels(observed: torch.Tensor, margin: Sequence[int], edges: bool = True) -> np.ndarray:
    """Whether the box of ``margin`` pixels per side around each training pixel lies in the grid, all measured.

    Parameters
    ----------
    observed
        ``(*grid)``, nonzero at the measured pixels.
    margin
        Pixels per axis.
    edges
        Whether a box reaching beyond the grid is unclean; ``False``: only missing
        pixels in it count.

    Returns
    -------
    numpy.ndarray
        ``(*grid)`` booleans.
    """
    unmeasured = (observed.detach().cpu().numpy() == 0).astype(np.int64)
    for axis, m in enumerate(margin):
        padding = [(0, 0)] * unmeasured.ndim
        padding[axis] = (m + 1, m)
        total = np.pad(unmeasured, padding, constant_values=int(edges)).cumsum(axis)
        upper = np.take(total, np.arange(2 * m + 1, total.shape[axis]), axis=axis)
        lower = np.take(total, np.arange(0, total.shape[axis] - 2 * m - 1), axis=axis)
        unmeasured = upper - lower  # unmeasured pixels in the box along this axis
    return unmeasured == 0


@dataclass(frozen=True)
class EdgeWindow:
    """A window at the low end of one or more axes whose variances serve every test point of those bands.

    Away from the corners and from missing pixels, a test point's variance depends only
    on its distance to the edge and its offset from its nearest pixel (the model is
    translation invariant): one strip window, ``2 m`` pixels deep and ``2 m + 1`` wide,
    serves the whole edge.  The kernel is also symmetric under the reflection of each
    axis about the scan's centre, which maps the high end's window onto the low end's:
    the window also serves the opposite edge, at the reflected test coordinates.

    Attributes
    ----------
    window
        Its pixels (``window.test`` indexes :attr:`coordinates`).
    coordinates
        Per axis, the test coordinates solved in the window (pixels of the training
        grid; the high end's reflected).
    targets
        Per axis, the indices of the test coordinates that get its variances.
    sources
        Per axis, for each target, its position in :attr:`coordinates`.
    """

    window: Window
    coordinates: tuple[torch.Tensor, ...]
    targets: tuple[torch.Tensor, ...]
    sources: tuple[torch.Tensor, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.window.shape


def _edge_classes(pts: torch.Tensor, coords: torch.Tensor, m: int) -> list[tuple] | None:
    """One axis' two classes of :func:`edge_windows`: ``(range, coordinates, targets, sources)`` each.

    *Edge*: the test coordinates whose nearest pixel is within ``m`` of the first pixel,
    and those within ``m`` of the last, reflected (``x → p_0 + p_{n−1} − x``); solved
    in the window ``[0, 2m)``.  *Mid*: every other coordinate, represented by those of
    the middle pixel at the same offset, solved in ``2m + 1`` pixels around it.
    """
    n = len(pts)
    pts, coords = pts.detach().cpu().double(), coords.detach().cpu().double()
    if n < 2 * m + 2 or not torch.allclose(pts[1:] - pts[:-1], torch.ones(n - 1, dtype=pts.dtype)):
        return None  # (translation invariance needs a regular grid)
    near = nearest_pixels(pts, coords)
    low, high = torch.nonzero(near < m).reshape(-1), torch.nonzero(near >= n - m).reshape(-1)
    reflected = torch.cat([coords[low], float(pts[0] + pts[-1]) - coords[high]])
    _, first, sources = np.unique(np.round(reflected.numpy(), 9), return_index=True, return_inverse=True)
    edge = ((0, 2 * m), reflected[first], torch.cat([low, high]), torch.from_numpy(sources.reshape(-1)))
    middle = n // 2
    rep = torch.nonzero(near == middle).reshape(-1)
    mid = torch.nonzero((near >= m) & (near < n - m)).reshape(-1)
    offsets = (coords[mid] - pts[near[mid]])[:, None] - (coords[rep] - pts[middle])[None, :]
    if len(mid) and (not len(rep) or float(offsets.abs().min(1).values.max()) > 1e-9):
        return None
    source = offsets.abs().argmin(1) if len(mid) else mid
    return [edge, ((middle - m, middle + m + 1), coords[rep], mid, source)]


def edge_windows(points: Sequence[torch.Tensor], test_coords: Sequence[torch.Tensor],
                 margin: Sequence[int]) -> list[EdgeWindow] | None:
    """The windows of the edges and corners of a complete scan (``2^d − 1``), or ``None`` where they do not apply.

    Per axis a test coordinate is *edge* (its nearest pixel within ``m`` of the first or
    the last pixel) or *mid* (:func:`_edge_classes`); every combination but all-mid gets
    one window, which serves both ends of its edge axes by reflection: on a 2-D scan one
    window for the four corners and one per pair of opposite edges.  ``None`` where an
    axis is shorter than ``2m + 2`` pixels (no mid), the grid is not regular, or a mid
    coordinate's offset is not among the middle pixel's (test coordinates that are not
    a lattice).  The windows stand for boxes without missing pixels: test points with
    one within the margin need the windows of :func:`plan_exact_variance`.
    """
    classes = [_edge_classes(pts, coords, m) for pts, coords, m in zip(points, test_coords, margin)]
    if any(c is None for c in classes):
        return None
    out = []
    no_missing = torch.zeros(0, len(points), dtype=torch.long)
    for combination in itertools.product(*[range(2)] * len(points)):
        if all(c == 1 for c in combination):  # the interior: the periodic twin's
            continue
        parts = [classes[a][c] for a, c in enumerate(combination)]
        if any(not len(target) for _, _, target, _ in parts):
            continue
        window = Window(tuple(r for r, _, _, _ in parts), tuple(torch.arange(len(c)) for _, c, _, _ in parts),
                        no_missing)
        out.append(EdgeWindow(window, *(tuple(part[i] for part in parts) for i in (1, 2, 3))))
    return out


@dataclass(frozen=True)
class VariancePlan:
    """Where the exact variance of each test point that is not clean comes from.

    Attributes
    ----------
    windows
        The windows (:func:`edge_windows`, then the cores of
        :func:`~hyperspy_gp.gp.schur_windows.cut_windows`, whose values stand).
    twin_points
        ``(m, d)`` indices of the test points that get the periodic twin's variance plus
        its missing-pixel increase
        (:meth:`~hyperspy_gp.gp.periodic_twin.PeriodicTwin.missing_increase`).
    """

    windows: list[Window | EdgeWindow]
    twin_points: torch.Tensor
    #: The windows' margin, in length scales of the longest axis' (:data:`MARGIN_ERROR_BOUNDS`).
    lengthscales: float = WINDOW_LENGTHSCALES


def plan_exact_variance(kernel: GridKernel, lengthscale: torch.Tensor, observed: torch.Tensor,
                        test_coords: Sequence[torch.Tensor], everywhere: bool = False,
                        lengthscales: float = WINDOW_LENGTHSCALES) -> VariancePlan:
    """The windows and twin points of every test point at a pixel that is not clean (:func:`clean_pixels`).

    Where :func:`edge_windows` apply, the edges and corners get them; the test points
    with a missing pixel within the margin of their nearest pixel get the twin's
    increase where that pixel is a margin inside the scan (the twin differs from the
    model there only beyond the margin and at the missing pixels), and the window of
    their core where it is not.  Otherwise every core that holds a test point at a
    pixel that is not clean gets its window.

    Parameters
    ----------
    kernel
        The model's kernel (its training points).
    lengthscale
        ``(P, d)``; the margins are :func:`~hyperspy_gp.gp.schur_windows.margins`.
    observed
        ``(*grid)``, nonzero at the measured pixels.
    test_coords
        One 1-D tensor of test coordinates per axis (pixel units of the training grid).
    everywhere
        Every core a window, no twin points (where the periodic twin's variance cannot
        be trusted).
    lengthscales
        The margin, in length scales (:data:`MARGIN_ERROR_BOUNDS`).
    """
    # Test points lie up to half a pixel beyond their nearest pixel: one pixel more.
    margin = [m + 1 for m in margins(lengthscale, lengthscales)]
    missing = torch.nonzero(observed.detach().cpu() == 0)
    windows = cut_windows(kernel.points, missing, test_coords, margin)
    no_twin = torch.zeros(0, len(test_coords), dtype=torch.long)
    if everywhere:
        return VariancePlan(windows, no_twin, lengthscales)
    edges = edge_windows(kernel.points, test_coords, margin)
    nearest = torch.meshgrid(*[nearest_pixels(p, c) for p, c in zip(kernel.points, test_coords)], indexing="ij")
    clean = torch.from_numpy(clean_pixels(observed, margin, edges=edges is None))
    twin = no_twin
    if edges is not None:  # missing pixels a margin inside the scan: the periodic twin's increase
        inside = torch.from_numpy(clean_pixels(torch.ones_like(observed), margin))
        twin = torch.nonzero((inside & ~clean)[nearest])
        clean |= inside
    clean_test = clean[nearest]
    needed = [window for window in windows
              if not bool(clean_test[torch.meshgrid(*window.test, indexing="ij")].all())]
    return VariancePlan((edges or []) + needed, twin, lengthscales)


def error_bounds(lengthscale: torch.Tensor, observed: torch.Tensor, points: Sequence[torch.Tensor],
                 test_coords: Sequence[torch.Tensor], plan: VariancePlan,
                 rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The bound on the relative error of every test point's variance as ``plan`` computes it.

    The windows and twin points of ``plan`` hold its margin's bound
    (:func:`margin_error_bound`); so does every test point whose nearest pixel is not
    clean at a longer margin.  The other test points get the periodic twin's variance,
    which there is the model's within that longer margin's bound (the longest such).

    With ``rows`` ``(start, stop)``, those rows of the first test axis only.

    Returns
    -------
    torch.Tensor
        ``(*test)``, float64 on the CPU.
    """
    start, stop = (0, len(test_coords[0])) if rows is None else rows
    chunk = [test_coords[0][start:stop], *test_coords[1:]]
    nearest = torch.meshgrid(*[nearest_pixels(p, c) for p, c in zip(points, chunk)], indexing="ij")
    own = margin_error_bound(plan.lengthscales, lengthscale)
    bound = torch.full(nearest[0].shape, own, dtype=torch.float64)
    for longer in (c for c in MARGIN_ERROR_BOUNDS if c > plan.lengthscales):  # (the dict runs longest first)
        margin = [m + 1 for m in margins(lengthscale, longer)]
        clean = torch.from_numpy(clean_pixels(observed, margin))[nearest]
        bound[clean] = torch.clamp_max(bound[clean], margin_error_bound(longer, lengthscale))
    for window in plan.windows:  # a core's window overwrites its clean test points too
        if not isinstance(window, EdgeWindow):
            first = window.test[0][(window.test[0] >= start) & (window.test[0] < stop)] - start
            bound[torch.meshgrid(first, *window.test[1:], indexing="ij")] = own
    return bound


def _pixels(item: Window | EdgeWindow) -> Window:
    """The window whose pixels are factorised (an edge window's own)."""
    return item.window if isinstance(item, EdgeWindow) else item


def _measured(item: Window | EdgeWindow) -> int:
    window = _pixels(item)
    return math.prod(window.shape) - len(window.missing)


def _n_test(item: Window | EdgeWindow) -> int:
    """Test points solved in the window."""
    return math.prod(len(t) for t in _pixels(item).test)


def _key(window: Window, points: Sequence[torch.Tensor], test_coords: Sequence[torch.Tensor]) -> tuple:
    """What a window's variances depend on: its shape, its missing pixels and its test points, all relative to it.

    On a regular grid the model is translation invariant, so windows with the same key
    (e.g. around missing pixels at the same place in their cores) have the same
    variances, and only one of them is factorised.
    """
    relative = tuple(np.round((c.detach().cpu().double()[t] - float(p[start])).numpy(), 9).tobytes()
                     for c, t, p, (start, _) in zip(test_coords, window.test, points, window.ranges))
    return window.shape, window.missing.numpy().tobytes(), relative


#: Where a window's variances go: per axis the test indices that get them, and their
#: positions in the window's test points (``None``: all of them, in order).
Placement = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]


def distinct_windows(windows: Sequence[Window | EdgeWindow], points: Sequence[torch.Tensor],
                     test_coords: Sequence[torch.Tensor]) -> list[tuple[Window | EdgeWindow, list[Placement]]]:
    """The windows to compute, in order, each with its placements.

    Windows with the same :func:`_key` (regular grids only) are computed once; an
    :class:`EdgeWindow` is placed along its edges.
    """
    uniform = all(torch.allclose(p[1:] - p[:-1], torch.ones_like(p[1:])) for p in points)
    groups: dict = {}
    for i, item in enumerate(windows):
        if isinstance(item, EdgeWindow):
            groups[("edge", i)] = (item, [(item.targets, item.sources)])
            continue
        key = _key(item, points, test_coords) if uniform else i
        groups.setdefault(key, (item, []))[1].append((item.test, None))
    return list(groups.values())


def window_variance_cost(windows: Sequence[Window | EdgeWindow], n_tasks: int, n_models: int, n_missing: int = 0,
                         n_twin_points: int = 0) -> float:
    """Multiply-adds of :func:`window_variance` for these (distinct) windows, and of the twin's increase.

    Per model, whitened map and window ``|O|³ / 3 + |O|² m``; for the increase of
    :attr:`VariancePlan.twin_points` over ``|M|`` missing pixels ``|M|³ / 3 + |M|² m``.
    """
    sizes = [(_measured(w), _n_test(w)) for w in windows] + [(n_missing, n_twin_points)]
    return float(n_models * n_tasks) * sum(float(o) ** 3 / 3 + float(o) ** 2 * m for o, m in sizes)


#: Multiply-adds of dense algebra that take as long as one draw of the Monte-Carlo
#: variance per map and upsampled pixel (a CG solve and FFTs on the torus).  Measured
#: on 2 CPU cores, 64 draws at 2×, Matérn-5/2 at 2–3 px: 64² × 6 in 3.3 s, 128² × 6 in
#: 15.7 s, 256² × 6 in 71 s; dense factorisations and triangular solves run at about
#: 35e9 multiply-adds per second.
DRAW_COST_PER_PIXEL = 2e4
#: The windows serve where they cost at most this many times the draws they replace ...
WINDOWS_OVER_DRAWS = 2.0
#: ... or at most this many multiply-adds (a few seconds on 2 CPU cores) in any case.
WINDOWS_ALWAYS_AFFORDABLE = 1e11


def drawn_variance_cost(n_fine: int, n_tasks: int, n_models: int, n_samples: int) -> float:
    """The Monte-Carlo variance's time, in multiply-adds of dense algebra (:data:`DRAW_COST_PER_PIXEL`)."""
    return DRAW_COST_PER_PIXEL * n_samples * n_tasks * n_models * n_fine


def window_variance_fits(windows: Sequence[Window | EdgeWindow], n_tasks: int, n_models: int, device: str = "cpu",
                         drawn_cost: float = math.inf, n_missing: int = 0, n_twin_points: int = 0) -> bool:
    """Whether :func:`window_variance` (and the twin's increase) is affordable on ``device``, and worth it.

    Every window's measured pixels squared at most
    :data:`~hyperspy_gp.memory.MAX_VARIANCE_WINDOW_SQUARED` (three such matrices are
    held), the twin's missing pixels squared at most
    :data:`~hyperspy_gp.memory.MAX_WINDOW_MISSING_SQUARED` (two); the cost
    (:func:`window_variance_cost`) within :func:`~hyperspy_gp.memory.increase_cost_limit`, and within
    :data:`WINDOWS_OVER_DRAWS` times ``drawn_cost`` (:func:`drawn_variance_cost`) unless
    it is under :data:`WINDOWS_ALWAYS_AFFORDABLE`.
    """
    small = all(_measured(w) ** 2 <= memory.MAX_VARIANCE_WINDOW_SQUARED for w in windows) and \
        n_missing**2 <= memory.MAX_WINDOW_MISSING_SQUARED
    cost = window_variance_cost(windows, n_tasks, n_models, n_missing, n_twin_points)
    worth_it = cost <= max(WINDOWS_ALWAYS_AFFORDABLE, WINDOWS_OVER_DRAWS * drawn_cost)
    return small and worth_it and cost <= memory.increase_cost_limit(device)


def window_variance(kernel: GridKernel, lengthscale: torch.Tensor, task_covariance: torch.Tensor,
                    noise: torch.Tensor, windows: Sequence[Window | EdgeWindow],
                    test_coords: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Write each window's exact posterior variance of its core's test points into ``out``.

    :func:`solve_windows`, then :func:`place_windows`.

    Parameters
    ----------
    kernel
        The model's kernel, any kind (its training points and :meth:`~hyperspy_gp.gp.kernels.GridKernel.point_kernel`).
    lengthscale, task_covariance, noise
        The fitted ``(P, d)``, ``(P, T, T)`` and ``(P, T)``.
    windows
        From :func:`plan_exact_variance` (or :func:`~hyperspy_gp.gp.schur_windows.cut_windows`)
        for the same test grid.
    test_coords
        One 1-D tensor of test coordinates per axis.
    out
        ``(P, T, *test)``, channel-first; the windows' cores are overwritten.

    Returns
    -------
    torch.Tensor
        ``out``.  Computed in float64 on ``out``'s device, one model at a time.
    """
    solved = solve_windows(kernel, lengthscale, task_covariance, noise, windows, test_coords, out.device)
    return place_windows(solved, out)


@dataclass(frozen=True)
class SolvedWindow:
    """A distinct window's variances and where they go (:func:`distinct_windows`).

    Attributes
    ----------
    variance
        ``(P, T, *solved)`` float64, its test points' variances.
    placements
        Per placement, per axis, the test indices that get them and their positions
        among the solved points (``None``: all, in order).
    """

    variance: torch.Tensor
    placements: list[Placement]


def solve_windows(kernel: GridKernel, lengthscale: torch.Tensor, task_covariance: torch.Tensor,
                  noise: torch.Tensor, windows: Sequence[Window | EdgeWindow], test_coords: Sequence[torch.Tensor],
                  device=None) -> list[SolvedWindow]:
    """Each distinct window's exact posterior variance of its core's test points (see :func:`window_variance`)."""
    dtype = torch.float64
    device = lengthscale.device if device is None else device
    out = []
    with torch.no_grad():
        ell, b, d = (x.detach().to(device, dtype) for x in (lengthscale, task_covariance, noise))
        root, gamma, rotation = whiten_tasks(b, d)
        loadings = (root[:, :, None] * rotation).pow(2) * gamma[:, None, :]  # U_tk² γ_k, (P, T, K)
        points = [p.detach().to(device, dtype) for p in kernel.points]
        coords = [c.detach().to(device, dtype) for c in test_coords]
        for item, placements in distinct_windows(windows, kernel.points, test_coords):
            window = _pixels(item)
            local = window.observed().to(device)  # (an edge window stands for a box without missing pixels)
            starts = [start for start, _ in window.ranges]
            train = torch.stack([p[start + local[:, a]] for a, (p, start) in enumerate(zip(points, starts))], -1)
            solved = [c.to(device, dtype) for c in item.coordinates] if isinstance(item, EdgeWindow) else \
                [c[i.to(device)] for c, i in zip(coords, window.test)]
            test = grid_points(solved)
            values = torch.stack([_whitened_variances(kernel, ell[j : j + 1], gamma[j], train, test)
                                  for j in range(ell.shape[0])])  # (P, K, m)
            variance = torch.einsum("ptk,pkm->ptm", loadings, values)
            out.append(SolvedWindow(variance.reshape(*variance.shape[:2], *(len(c) for c in solved)), placements))
    return out


def place_windows(solved: Sequence[SolvedWindow], out: torch.Tensor,
                  rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Write the windows' variances into ``out`` ``(P, T, *test)``, or into its rows ``[start, stop)`` of the test grid.

    With ``rows``, ``out`` holds only those rows of the first test axis (a chunk).
    """
    start, stop = (0, out.shape[2]) if rows is None else rows
    for item in solved:
        variance = item.variance.to(out.device, out.dtype)
        for targets, sources in item.placements:
            first = targets[0].to(out.device)
            kept = torch.nonzero((first >= start) & (first < stop)).reshape(-1)
            if not len(kept):
                continue
            targets = (first[kept] - start, *(t.to(out.device) for t in targets[1:]))
            sources = (kept, *(torch.arange(n, device=out.device) for n in variance.shape[3:])) if sources is None \
                else (sources[0].to(out.device)[kept], *(s.to(out.device) for s in sources[1:]))
            index = torch.meshgrid(*targets, indexing="ij")
            spread = torch.meshgrid(*sources, indexing="ij")
            out[(slice(None), slice(None), *index)] = variance[(slice(None), slice(None), *spread)]
    return out


@dataclass(frozen=True)
class WindowedVariance:
    """The parts of the windows' variance on one test grid, from which chunks of rows are assembled.

    Computed once per test grid (:class:`~hyperspy_gp.gp.iterative_prediction.IterativePosterior`):
    the periodic twin's variance per coset, its increase at the twin points and the
    windows' variances, all small beside the grid; :meth:`rows` then fills any rows of
    it without the whole grid in memory.

    Attributes
    ----------
    per_coset
        The periodic twin's variance per coset ``(P, T, u, ..., u)``; ``None`` where the
        windows cover every test point.
    twin_points, twin_increase
        ``(m, d)`` test indices and the twin's increase there, ``(P, T, m)``.
    windows
        :func:`solve_windows`.
    plan
        The :class:`VariancePlan` that served.
    floor
        The exact parts' rounding floor per map, ``(P, T)``.
    """

    per_coset: torch.Tensor | None
    twin_points: torch.Tensor
    twin_increase: torch.Tensor
    windows: list[SolvedWindow]
    plan: VariancePlan
    floor: torch.Tensor

    def rows(self, start: int, stop: int, tail: Sequence[int]) -> torch.Tensor:
        """The variance at rows ``[start, stop)`` of the test grid, ``(P, T, stop − start, *tail)``."""
        shape = (stop - start, *tail)
        variance = self.floor.new_zeros(*self.floor.shape, *shape) if self.per_coset is None else \
            tile_cosets(self.per_coset, shape, start)
        points = self.twin_points.to(variance.device)
        kept = torch.nonzero((points[:, 0] >= start) & (points[:, 0] < stop)).reshape(-1)
        if len(kept):
            at = points[kept]
            index = (slice(None), slice(None), at[:, 0] - start, *at[:, 1:].unbind(-1))
            variance[index] += self.twin_increase[:, :, kept].to(variance.device, variance.dtype)
        return place_windows(self.windows, variance, (start, stop))


def _whitened_variances(kernel: GridKernel, lengthscale: torch.Tensor, gamma: torch.Tensor, train: torch.Tensor,
                        test: torch.Tensor) -> torch.Tensor:
    """``k(0) − γ_k k_{*O}ᵀ (γ_k K_OO + I)⁻¹ k_{*O}`` for every whitened map ``k`` and test point, ``(K, m)``."""
    prior = kernel.point_kernel(lengthscale, test[:1], test[:1])[0, 0, 0]
    out = prior.expand(len(gamma), len(test)).clone()
    if not len(train):
        return out
    gram = torch.cat([kernel.point_kernel(lengthscale, train[start : start + TEST_BLOCK], train)[0]
                      for start in range(0, len(train), TEST_BLOCK)])
    factor = torch.empty_like(gram)  # one factor held at a time, beside the Gram matrix
    for k, g in enumerate(gamma.tolist()):
        if g <= 0:  # a map with no signal (rank-deficient B): nothing explained
            continue
        torch.mul(gram, g, out=factor).diagonal().add_(1.0)
        torch.linalg.cholesky(factor, out=factor)
        for start in range(0, len(test), TEST_BLOCK):
            cross = kernel.point_kernel(lengthscale, train, test[start : start + TEST_BLOCK])[0]  # (o, block)
            explained = torch.linalg.solve_triangular(factor, cross, upper=False).pow(2).sum(0)
            out[k, start : start + TEST_BLOCK] -= g * explained
    return out.clamp_min_(0.0)
