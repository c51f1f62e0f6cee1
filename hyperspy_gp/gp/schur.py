r"""Exact inference with a few missing pixels on a large grid (Schur complement).

With ``M`` the missing and ``O`` the observed values of the full-grid covariance
``Σ = B ⊗ K + D ⊗ I`` (whose inverse the Kronecker eigenbasis applies cheaply) and
``C = (Σ^{-1})_{MM}``, the Schur complement gives, exactly,

.. math::

    \log\det Σ_{OO} = \log\det Σ + \log\det C, \qquad
    y_Oᵀ Σ_{OO}^{-1} y_O = \min_{z} ȳ(z)ᵀ Σ^{-1} ȳ(z),

where ``ȳ(z)`` is ``y_O`` completed by values ``z`` at the missing pixels; the
minimiser ``z* = -C^{-1} (Σ^{-1} ȳ(0))_M`` is the conditional mean of the missing
values.  Hence

.. math::  \log p(y_O) = \log p_{grid}(ȳ(z*)) - ½ \log\det C + ½ |M| \log 2π,

with ``log p_grid`` the structured likelihood of :mod:`~hyperspy_gp.gp.likelihood`.
Gradients need no new algebra: ``z*`` is a minimiser, so the grid likelihood is
differentiated with ``ȳ(z*)`` held fixed (envelope theorem), and with ``C^{-1} = L^{-T}
L^{-1}`` and ``H = Σ^{-1} E_M L^{-T}``, ``∂(-½ \log\det C) = ½ Σ_k h_kᵀ ∂Σ h_k``, the
derivative of quadratic forms in ``Σ`` itself (mode products with the kernel factors,
no eigendecomposition).  The posterior is the full-grid one for ``ȳ(z*)`` plus the
variance correction ``Σ_k (k*ᵀ h_k)²``.

Cost per evaluation: one structured solve per missing value, ``O(|M| n Σ_a n_a)``, and
``|M| · n · T`` values of memory, so this path is for a few missing pixels on a large
grid (:data:`~hyperspy_gp.memory.MAX_SCHUR_ENTRIES`); :mod:`~hyperspy_gp.gp.dense` serves small grids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hyperspy_gp.gp.cholesky import safe_cholesky
from hyperspy_gp.gp.likelihood import GridICMSolve, grid_icm_log_likelihood, solve_grid_icm
from hyperspy_gp.gp.prediction import DEFAULT_CHUNK_BYTES, GridPosterior
from hyperspy_gp.gp.tensor import kron_dot, kron_rows


def _gather(grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Values of ``(P, *fg, ...)`` at the pixels ``index`` ``(m, d)`` → ``(P, m, ...)``."""
    return grid[(slice(None), *index.T)]


def _missing_columns(solve: GridICMSolve, index: torch.Tensor) -> torch.Tensor:
    """``G = Σ^{-1} E_M`` in grid layout ``(P, *fg, T, m·T)`` (column ``i·T + t``)."""
    rotated = kron_rows(solve.eigenvectors, index).movedim(1, -1)  # Qᵀ e_i in the eigenbasis, (P, *fg, m)
    inv_blocks = solve.block_inverse()  # (P, *fg, T, T)
    weights = rotated[..., None, :, None] * inv_blocks[..., :, None, :]  # (P, *fg, T, m, T)
    p, *fg, t, m, _ = weights.shape
    columns = kron_dot(weights.reshape(p, *fg, t * m * t), solve.eigenvectors)
    return columns.reshape(p, *fg, t, m * t)


def _apply_covariance(h: torch.Tensor, task_covariance, noise, factors) -> torch.Tensor:
    """``Σ h`` for columns ``h`` ``(P, *fg, T, K)``; differentiable in ``B``, ``σ²``, ``K_a``."""
    p, *fg, t, k = h.shape
    kh = kron_dot(h.reshape(p, *fg, t * k), factors).reshape(p, *fg, t, k)
    b = task_covariance.reshape(p, *([1] * len(fg)), t, t)
    return b @ kh + noise.reshape(p, *([1] * len(fg)), t, 1) * h


class SchurSolve:
    """Completed targets ``ȳ(z*)``, ``log det C`` and the columns ``H`` (no autograd)."""

    def __init__(self, targets, task_covariance, noise, factors, index: torch.Tensor) -> None:
        with torch.no_grad():
            zeroed = targets.clone()
            zeroed[(slice(None), *index.T)] = 0.0
            solve = self.grid_solve = solve_grid_icm(zeroed, task_covariance, noise, factors)
            columns = _missing_columns(solve, index)  # (P, *fg, T, mT)
            p, t = columns.shape[0], columns.shape[-2]
            c = _gather(columns, index).reshape(p, -1, columns.shape[-1])  # rows i·T + s
            # A principal submatrix of Σ⁻¹: positive definite, its condition number at most
            # Σ's, whose own jitter (if any) the grid solve reports.
            chol, _ = safe_cholesky(0.5 * (c + c.transpose(-1, -2)))
            alpha0 = kron_dot(solve.rotated_weights, solve.eigenvectors)
            u = _gather(alpha0, index).reshape(p, -1, 1)
            z = -torch.cholesky_solve(u, chol).reshape(p, -1, t)
            self.completed = zeroed
            self.completed[(slice(None), *index.T)] = z
            self.logdet_c = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            flat = columns.reshape(p, -1, columns.shape[-1])  # (P, n·T, mT)
            h = torch.linalg.solve_triangular(chol, flat.transpose(-1, -2), upper=False)  # Hᵀ
            self.columns = h.transpose(-1, -2).reshape(columns.shape)
            self.n_missing_values = columns.shape[-1]


def schur_log_likelihood(targets, task_covariance, noise, factors, index: torch.Tensor) -> torch.Tensor:
    """Exact ``log p(y_O)`` per model, ``(P,)``, on a grid with missing pixels ``index``.

    Parameters
    ----------
    targets
        ``(P, *fg, T)`` maps in factor layout; values at the missing pixels are ignored.
    task_covariance, noise, factors
        As for :func:`~hyperspy_gp.gp.likelihood.grid_icm_log_likelihood`.
    index
        ``(m, n_factors)`` coordinates of the missing pixels in factor layout.

    Returns
    -------
    torch.Tensor
        Differentiable in every argument but ``targets`` (see the module docstring).
    """
    schur = SchurSolve(targets, task_covariance, noise, factors, index)
    full = grid_icm_log_likelihood(schur.completed, task_covariance, noise, factors)
    h = schur.columns
    quad = (h * _apply_covariance(h, task_covariance, noise, factors)).sum(dim=tuple(range(1, h.dim())))
    correction = -0.5 * schur.logdet_c + 0.5 * schur.n_missing_values * math.log(2.0 * math.pi)
    return full + correction + 0.5 * (quad - quad.detach())


class SchurPosterior(GridPosterior):
    """Posterior of a model fitted to a grid with a few missing pixels (exact).

    The mean is the full-grid posterior mean for the completed maps ``ȳ(z*)``; the
    variance adds back ``Σ_k (k*ᵀ h_k)²`` for what the missing pixels do not tell.

    Parameters
    ----------
    model
        A fitted :class:`~hyperspy_gp.gp.model.GridICMModel` with ``observed`` set.
    targets
        ``(P, *grid, T)`` maps; values at missing pixels are ignored.
    """

    def __init__(self, model, targets: torch.Tensor) -> None:
        with torch.no_grad():
            factors = model.kernel.factors(model.lengthscale)
            schur = SchurSolve(model.as_factor_layout(targets), model.task_covariance, model.noise, factors,
                               model.missing_index)
            completed = schur.completed.reshape(targets.shape)
            self.task_covariance = model.task_covariance
        super().__init__(model, completed, solve=schur.grid_solve.with_targets(schur.completed))
        self.columns = schur.columns  # (P, *fg, T, mT)

    def predict(self, test_coords: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and variance ``(P, m_1, ..., m_d, T)`` on the grid of ``test_coords``."""
        mean, variance = super().predict(test_coords)
        with torch.no_grad():
            cross = self.model.kernel.cross_factors(self.lengthscale, test_coords)
            h = self.columns
            p, *fg, t, k = h.shape
            kh = kron_dot(h.reshape(p, *fg, t * k), cross).reshape(p, -1, t, k)  # (P, m*, T, mT)
            # cov(f_t(x*), y) = (B ⊗ k*ᵀ) applied to each column h_k.
            increase = (self.task_covariance[:, None] @ kh).pow(2).sum(-1).reshape(variance.shape)
        return mean, variance + increase

    def default_chunk_rows(self, test_coords: Sequence[torch.Tensor]) -> int:
        """Rows per chunk keeping the ``k*ᵀ H`` temporaries under :data:`~hyperspy_gp.gp.prediction.DEFAULT_CHUNK_BYTES`."""
        rows = super().default_chunk_rows(test_coords)
        per_row = math.prod(len(c) for c in test_coords[1:]) * self.columns.shape[0] * self.columns.shape[-1] \
            * self.columns.shape[-2] * 8 * 3
        return max(1, min(rows, DEFAULT_CHUNK_BYTES // max(per_row, 1)))
