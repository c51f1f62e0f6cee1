r"""The variance increase of missing pixels, window by window (screening).

After a fit with missing pixels ``M`` the posterior variance is the complete grid's,
exact in the Kronecker eigenbasis, plus the increase ``Var(f*|O) − Var(f*|grid)``: the
mean square of the gap ``E[f*|grid] − E[f*|O]``.  :func:`~hyperspy_gp.gp.schur.streamed_increase`
computes it exactly from the complement ``C = (Σ^{-1})_{MM}`` of the whole grid, at
``|M|³`` cost.

The gap at ``x*`` depends on the data and the missing pixels near ``x*`` only: the
weights of the data in a posterior mean decay like the Matérn kernel, about
``exp(-√5 r/ℓ)``, so the increase is that of a *window* around ``x*`` up to a relative
error of about its square.  Here the test grid is cut into cores of
``max(m_a, MIN_CORE)`` training pixels per axis; each core's test points get the exact
increase (:func:`~hyperspy_gp.gp.schur.streamed_increase`) of the same model on its
core plus ``m_a = ⌈WINDOW_LENGTHSCALES · ℓ_a⌉`` pixels on each side, with that
window's own missing pixels.  The windows' complements are small, so the cost is
about ``n (3m)⁴ f³ T`` (missing fraction ``f``) instead of ``(f n)³ T``.

Truncation error, measured against dense algebra on 44² grids (ℓ = 2 and 4 px, noise
1e-4 to 1 of the prior variance, half the pixels missing at random, 90 % missing, a
disc), as the largest relative error of the variance of any pixel: 1e-3 with windows
of 3 length scales, 1.4e-4 with 4, 8e-6 with 5 and 5e-7 with 6, falling by ten to
twenty times per length scale.  Windows of 6 length scales are exact within the
equivalence tolerance; shorter ones serve, within their stated bound
(:data:`MARGIN_ERROR_BOUNDS`), where nothing exact is affordable.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hyperspy_gp import memory
from hyperspy_gp.gp.cholesky import safe_cholesky
from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.likelihood import GridICMSolve, solve_grid_icm
from hyperspy_gp.gp.schur import squared_test_products, streamed_increase
from hyperspy_gp.gp.tensor import kron_dot

#: Margin of every window, in length scales: at 6, the largest relative error of any
#: pixel's variance was 5e-7 on the cases of the module docstring (1e-6 is the
#: equivalence tolerance of the structured paths).
WINDOW_LENGTHSCALES = 6.0
#: Margins tried in turn where neither the streamed increase nor the windows of
#: :data:`WINDOW_LENGTHSCALES` are affordable, each with the stated bound on the
#: relative error of every pixel's variance (the full margin: the equivalence
#: tolerance), about ten times the largest measured against the streamed increase
#: (60 × 56 and 64 × 60 scans at 2×, ℓ = 0.7–2.5 px, noise 1e-4 to 0.05 of the prior,
#: 20 %, 50 % and 90 % missing at random, a masked disc): at 6 length scales 7.7e-7,
#: at 5 1.3e-5, at 4 1.1e-4, at 3 1.1e-3 (at 2, 1.5e-2: not offered); smaller at longer
#: length scales (96 × 90, half missing at 4.8/4 px: 3.0e-6 at 4, 7.7e-5 at 3).
MARGIN_ERROR_BOUNDS = {WINDOW_LENGTHSCALES: 1e-6, 5.0: 1e-4, 4.0: 1e-3, 3.0: 1e-2}
#: Smallest core, in training pixels per axis: short length scales would otherwise make
#: thousands of tiny windows, each a few Python-level steps.
MIN_CORE = 16


@dataclass(frozen=True)
class Window:
    """One window: its training-pixel ranges, the test points of its core and its missing pixels.

    Attributes
    ----------
    ranges
        Per axis, ``(start, stop)`` of the window's training pixels.
    test
        Per axis, the indices of the test coordinates in the core.
    missing
        ``(m_W, d)`` the window's missing pixels, in window coordinates.
    """

    ranges: tuple[tuple[int, int], ...]
    test: tuple[torch.Tensor, ...]
    missing: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(stop - start for start, stop in self.ranges)

    @property
    def solved(self) -> int:
        """Pixels of the window's dense factorisation: its missing or its observed ones, the fewer."""
        return min(len(self.missing), math.prod(self.shape) - len(self.missing))

    def observed(self) -> torch.Tensor:
        """``(o_W, d)`` the window's observed pixels, in window coordinates."""
        mask = torch.ones(self.shape, dtype=torch.bool)
        mask[tuple(self.missing.T)] = False
        return torch.nonzero(mask)


@dataclass(frozen=True)
class WindowPlan:
    """The windows of a variance increase and their margin, in length scales (:data:`MARGIN_ERROR_BOUNDS`)."""

    windows: list[Window]
    lengthscales: float


def margins(lengthscale: torch.Tensor, lengthscales: float = WINDOW_LENGTHSCALES) -> list[int]:
    """Window margins in pixels per axis, ``⌈lengthscales · ℓ_a⌉`` for the longest ``ℓ_a`` of any model."""
    longest = lengthscale.detach().reshape(-1, lengthscale.shape[-1]).max(0).values
    return [max(1, math.ceil(lengthscales * float(ell))) for ell in longest]


def nearest_pixels(points: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Index of the training point nearest each coordinate (``points`` increasing)."""
    points, coords = points.detach().cpu(), coords.detach().cpu().to(points.dtype)
    right = torch.searchsorted(points, coords).clamp(1, len(points) - 1) if len(points) > 1 \
        else torch.zeros(len(coords), dtype=torch.long)
    left = (right - 1).clamp_min(0)
    return torch.where((coords - points[left]).abs() <= (points[right] - coords).abs(), left, right)


def cut_windows(points: Sequence[torch.Tensor], missing_index: torch.Tensor, test_coords: Sequence[torch.Tensor],
                margin: Sequence[int]) -> list[Window]:
    """The windows covering ``test_coords`` (cores of :data:`MIN_CORE` or ``margin`` pixels, whichever is larger).

    Each test coordinate belongs to the core of its nearest training pixel, so it lies at
    least ``margin`` training pixels inside its window (or at the grid's edge).  Cores
    without test points are left out.
    """
    axes = []
    for pts, coords, m in zip(points, test_coords, margin):
        n, core = len(pts), max(m, MIN_CORE)
        owner = torch.div(nearest_pixels(pts, coords), core, rounding_mode="floor")
        axes.append([((max(0, j * core - m), min(n, (j + 1) * core + m)), torch.nonzero(owner == j).reshape(-1))
                     for j in range(math.ceil(n / core)) if bool((owner == j).any())])
    missing = missing_index.detach().cpu()
    out = []
    for combination in itertools.product(*axes):
        ranges = tuple(r for r, _ in combination)
        inside = torch.ones(len(missing), dtype=torch.bool)
        for a, (start, stop) in enumerate(ranges):
            inside &= (missing[:, a] >= start) & (missing[:, a] < stop)
        local = missing[inside] - torch.tensor([start for start, _ in ranges])
        out.append(Window(ranges, tuple(t for _, t in combination), local))
    return out


def windowed_cost(windows: Sequence[Window], n_tasks: int, n_models: int) -> float:
    """Multiply-adds of :func:`windowed_increase`: :func:`~hyperspy_gp.memory.streamed_increase_cost` per window.

    Counted for the pixels each window factorises (:attr:`Window.solved`); windows
    without missing pixels cost nothing.
    """
    return sum(memory.streamed_increase_cost(w.shape, w.solved, n_tasks, n_models, math.prod(len(t) for t in w.test))
               for w in windows if len(w.missing))


def windows_fit(windows: Sequence[Window], n_tasks: int, n_models: int, device: str = "cpu") -> bool:
    """Whether :func:`windowed_increase` is affordable on ``device``.

    Every window at most :data:`~hyperspy_gp.memory.MAX_WINDOW_PIXELS` pixels, its
    ``m_W²`` at most :data:`~hyperspy_gp.memory.MAX_WINDOW_MISSING_SQUARED`, and the cost
    (:func:`windowed_cost`) within the streamed increase's
    (:func:`~hyperspy_gp.memory.increase_cost_limit`).
    """
    small = all(math.prod(w.shape) <= memory.MAX_WINDOW_PIXELS and w.solved**2 <= memory.MAX_WINDOW_MISSING_SQUARED
                for w in windows if len(w.missing))
    return small and windowed_cost(windows, n_tasks, n_models) <= memory.increase_cost_limit(device)


def windowed_increase(kernel: GridKernel, lengthscale: torch.Tensor, task_covariance: torch.Tensor,
                      noise: torch.Tensor, windows: Sequence[Window],
                      test_coords: Sequence[torch.Tensor]) -> torch.Tensor:
    """The variance increase of the missing pixels on the test grid, ``(P, *test, T)``, window by window.

    Parameters
    ----------
    kernel
        The model's separable :class:`~hyperspy_gp.gp.kernels.GridKernel` (its training points).
    lengthscale, task_covariance, noise
        The fitted ``(P, d)``, ``(P, T, T)`` and ``(P, T)``.
    windows
        From :func:`cut_windows` for the same test grid.
    test_coords
        One 1-D tensor of test coordinates per axis (pixel units).

    Returns
    -------
    torch.Tensor
        ``Var(f*|O_W) − Var(f*|W)`` of each test point's window, 0 where its window has
        no missing pixel.
    """
    if kernel.kind != "separable":
        raise ValueError("Windows need the separable kernel's per-axis factors.")
    p, t = task_covariance.shape[:2]
    out = noise.new_zeros(p, *(len(c) for c in test_coords), t)
    with torch.no_grad():
        for window in windows:
            if not len(window.missing):
                continue
            points = [pts[start:stop].cpu() for pts, (start, stop) in zip(kernel.points, window.ranges)]
            local = GridKernel(window.shape, "separable", dtype=kernel.dtype, device=kernel.device, points=points)
            factors = local.factors(lengthscale)
            solve = solve_grid_icm(noise.new_zeros(p, *window.shape, t), task_covariance, noise, factors)
            cross = local.cross_factors(lengthscale, [c[i.to(c.device)] for c, i in zip(test_coords, window.test)])
            if len(window.missing) <= window.solved:
                rotated = [k @ q for k, q in zip(cross, solve.eigenvectors)]
                increase = streamed_increase(solve, task_covariance, window.missing.to(noise.device), rotated)
            else:
                increase = observed_side_increase(solve, task_covariance, window.observed().to(noise.device),
                                                  factors, cross)
            out[(slice(None), *torch.meshgrid(*[i.to(out.device) for i in window.test], indexing="ij"))] = increase
    return out


def observed_side_increase(solve: GridICMSolve, task_covariance: torch.Tensor,
                           observed: torch.Tensor, factors: Sequence[torch.Tensor],
                           cross: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""The increase :func:`~hyperspy_gp.gp.schur.streamed_increase` gives, from the observed pixels' side.

    In whitened maps (``W = D^{-1/2} R``, :func:`~hyperspy_gp.gp.likelihood.whiten_tasks`)
    the data are independent with covariance ``γ_k K + I``, and map ``t`` of the latent
    field covaries with them by ``(B w_k)_t k*``.  So

    .. math::  \mathrm{Var}(f_t | O) − \mathrm{Var}(f_t | \text{grid}) = Σ_k (B w_k)_t^2
        \left[k*ᵀ (γ_k K + I)^{-1} k* − k*_Oᵀ (γ_k K_{OO} + I)^{-1} k*_O\right]:

    the first term in the grid's eigenbasis, the second from the factor ``L_k`` of
    ``γ_k K_{OO} + I`` (``|O|³ / 3``), as ``Σ_j (k*ᵀ E_O L_k^{-T} e_j)²``
    (:func:`~hyperspy_gp.gp.schur.squared_test_products`).  Fewer values to factorise
    than the missing pixels' complement where most of a window is missing.

    Parameters
    ----------
    solve
        The grid's solve (eigenbasis, whitened tasks with its jitter).
    task_covariance
        ``(P, T, T)``.
    observed
        ``(o, d)`` the observed pixels.
    factors, cross
        The grid's kernel factors ``(P, n_a, n_a)`` and the test grid's ``(P, m_a, n_a)``.

    Returns
    -------
    torch.Tensor
        ``(P, *test, T)``.
    """
    root, gamma, rotation = solve.whitening
    task_gains = (task_covariance @ (rotation / root[:, :, None])).pow(2)  # (B w_k)_t², (P, T, T)
    squared = [(k @ q).pow(2) for k, q in zip(cross, solve.eigenvectors)]
    kernel = math.prod(f[:, i][:, :, i] for f, i in zip(factors, observed.T))  # K_OO, (P, o, o)
    lam, eye = solve.eigenvalues_grid, torch.eye(len(observed), dtype=kernel.dtype, device=kernel.device)
    increase = None
    for k in range(gamma.shape[-1]):
        scale = gamma[:, k].reshape(-1, *([1] * (lam.dim() - 1)))
        grid = kron_dot(1.0 / (lam * scale + 1.0), squared)  # k*ᵀ (γ_k K + I)⁻¹ k*, (P, *test)
        if len(observed):
            chol, _ = safe_cholesky(gamma[:, k, None, None] * kernel + eye)
            grid = grid - squared_test_products(chol, observed, lam.shape[1:],
                                                lambda fields: kron_dot(fields, cross), memory.STREAM_BLOCK)
        term = grid[..., None] * task_gains[:, :, k].reshape(-1, *([1] * (grid.dim() - 1)), task_gains.shape[1])
        increase = term if increase is None else increase + term
    return increase
