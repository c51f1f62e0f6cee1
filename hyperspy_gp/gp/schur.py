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

**One complement per whitened map.**  With ``D^{-1/2} B D^{-1/2} = R Γ Rᵀ`` and
``W = D^{-1/2} R`` (:func:`~hyperspy_gp.gp.likelihood.whiten_tasks`), ``Σ^{-1} = (W ⊗ I)
diag_k(Σ_k^{-1}) (Wᵀ ⊗ I)`` with ``Σ_k = γ_k K + I``.  Every map misses the same pixels,
so with ``G_k = Σ_k^{-1} E_M`` (``n × m``) and ``C_k = E_Mᵀ G_k``,

.. math::

    Σ^{-1} E_M = (W ⊗ I) \operatorname{diag}_k(G_k) (Wᵀ ⊗ I), \qquad
    C = (W ⊗ I) \operatorname{diag}_k(C_k) (Wᵀ ⊗ I), \qquad
    \log\det C = Σ_k \log\det C_k - m Σ_t \log D_t :

``T`` factorisations of ``m × m`` instead of one of ``mT × mT``, and ``m T`` column
fields on the grid instead of ``m T²``.  Gradients need no new algebra: ``z*`` is a
minimiser, so the grid likelihood is differentiated with ``ȳ(z*)`` held fixed (envelope
theorem).  With ``C_k = L_k L_kᵀ``, ``L = (W ⊗ I) diag_k(L_k)`` is a factor of ``C`` and
``H = Σ^{-1} E_M L^{-T} = (W ⊗ I) diag_k(H_k)``, ``H_k = G_k L_k^{-T}``, so

.. math::

    ∂(-½ \log\det C) = ½ Σ_{k, j} (w_kᵀ ∂B w_k)\, h_{kj}ᵀ ∂K h_{kj}
        + (w_kᵀ ∂D w_k)\, h_{kj}ᵀ h_{kj}

(``w_k`` the columns of ``W``, held fixed): quadratic forms in the kernel factors
themselves (mode products, no eigendecomposition, no derivative through ``R``).  The
posterior is the full-grid one for ``ȳ(z*)`` plus the variance increase ``Σ_k (B
w_k)_t² Σ_j (k*ᵀ h_{kj})²`` of map ``t``.

Cost per evaluation: one structured solve per missing pixel and whitened map,
``O(|M| T n Σ_a n_a)``, the triangular solves ``O(|M|² T n)``, and ``|M| · n · T``
values of memory, so this path is for a few missing pixels on a large grid
(:data:`~hyperspy_gp.memory.MAX_SCHUR_ENTRIES`); :mod:`~hyperspy_gp.gp.dense` serves
small grids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hyperspy_gp import memory
from hyperspy_gp.gp.cholesky import safe_cholesky
from hyperspy_gp.gp.likelihood import GridICMSolve, grid_icm_log_likelihood, solve_grid_icm
from hyperspy_gp.gp.prediction import DEFAULT_CHUNK_BYTES, GridPosterior
from hyperspy_gp.gp.tensor import kron_dot, kron_rows


def columns_fit(model) -> bool:
    """Whether the columns of ``model`` (``observed`` set) fit :data:`~hyperspy_gp.memory.MAX_SCHUR_ENTRIES`."""
    return memory.schur_columns_fit(model.observed.size, int((~model.observed).sum()), model.n_tasks, model.n_models)


def _gather(grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Values of ``(P, *fg, ...)`` at the pixels ``index`` ``(m, d)`` → ``(P, m, ...)``."""
    return grid[(slice(None), *index.T)]


def _whitened_columns(solve: GridICMSolve, gamma: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``G_k = Σ_k^{-1} E_M`` for every whitened map ``k``, ``(P, *fg, T, m)`` (one map at a time)."""
    rotated = kron_rows(solve.eigenvectors, index).movedim(1, -1)  # Qᵀ e_i in the eigenbasis, (P, *fg, m)
    lam = solve.eigenvalues_grid
    columns = rotated.new_empty(*rotated.shape[:-1], gamma.shape[-1], rotated.shape[-1])
    for k in range(gamma.shape[-1]):
        gains = 1.0 / (lam * gamma[:, k].reshape(-1, *([1] * (lam.dim() - 1))) + 1.0)  # 1 / (γ_k λ_j + 1)
        columns[..., k, :] = kron_dot(gains[..., None] * rotated, solve.eigenvectors)
    return columns


class SchurSolve:
    """Completed targets ``ȳ(z*)``, ``log det C``, the columns ``H_k`` and ``W`` (no autograd).

    Attributes
    ----------
    completed : torch.Tensor
        ``(P, *fg, T)`` targets with the conditional mean ``z*`` at the missing pixels.
    logdet_c : torch.Tensor
        ``(P,)`` ``log det C``.
    columns : torch.Tensor
        ``(P, *fg, T, m)``: ``H_k``'s ``m`` fields for each whitened map ``k``.
    task_weights : torch.Tensor
        ``(P, T, T)`` ``W``; column ``k`` is the task vector of map ``k``'s columns.
    """

    def __init__(self, targets, task_covariance, noise, factors, index: torch.Tensor) -> None:
        with torch.no_grad():
            zeroed = targets.clone()
            zeroed[(slice(None), *index.T)] = 0.0
            solve = self.grid_solve = solve_grid_icm(zeroed, task_covariance, noise, factors)
            # The grid solve's blocks are λ B + D + εI: its whitening has that diagonal.
            diagonal = noise + solve.jitter[:, None]
            root, gamma, rotation = solve.whitening
            columns = _whitened_columns(solve, gamma, index)  # G_k, (P, *fg, T, m)
            c = _gather(columns, index).permute(0, 2, 1, 3)  # C_k, (P, T, m, m)
            # C_k is a principal submatrix of Σ_k⁻¹: eigenvalues in [1 / (γ_k λ_max + 1), 1].
            chol, _ = safe_cholesky(0.5 * (c + c.transpose(-1, -2)))
            m = index.shape[0]
            self.logdet_c = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum((-2, -1)) \
                - m * torch.log(diagonal).sum(-1)
            # z* = -C⁻¹ u: u ↦ u W^{-T} = (u √D) R whitens, C_k⁻¹ per map, x ↦ x W⁻¹ = (x Rᵀ) √D.
            u = _gather(kron_dot(solve.rotated_weights, solve.eigenvectors), index)  # (P, m, T)
            whitened = ((u * root[:, None, :]) @ rotation).transpose(1, 2).unsqueeze(-1)  # (P, T, m, 1)
            x = torch.cholesky_solve(whitened, chol).squeeze(-1).transpose(1, 2)  # (P, m, T)
            self.completed = zeroed
            self.completed[(slice(None), *index.T)] = -(x @ rotation.transpose(1, 2)) * root[:, None, :]
            # H_k = G_k L_k⁻ᵀ, one map at a time and in place: the peak stays near |M| n T values.
            fields = columns.view(columns.shape[0], -1, *columns.shape[-2:])  # (P, n, T, m), the same memory
            for k in range(fields.shape[2]):
                fields[:, :, k] = torch.linalg.solve_triangular(chol[:, k].transpose(-1, -2), fields[:, :, k],
                                                                upper=True, left=False)
            self.columns = columns
            self.task_weights = rotation / root[:, :, None]
            self.n_missing_values = m * columns.shape[-2]


def _column_forms(schur: SchurSolve, task_covariance, noise, factors) -> torch.Tensor:
    """``Σ_{k,j} h_{kj}ᵀ Σ h_{kj}`` per model, differentiable in ``B``, ``σ²`` and ``K_a`` (``H``, ``W`` fixed)."""
    h, w = schur.columns, schur.task_weights
    p, *fg, t, m = h.shape
    kh = kron_dot(h.reshape(p, *fg, t * m), factors).reshape(h.shape)
    spatial = (h * kh).reshape(p, -1, t, m).sum((1, 3))  # Σ_j h_kjᵀ K h_kj, (P, T)
    squares = h.pow(2).reshape(p, -1, t, m).sum((1, 3))  # Σ_j h_kjᵀ h_kj
    task = torch.einsum("psk,pst,ptk->pk", w, task_covariance, w)  # w_kᵀ B w_k
    diagonal = torch.einsum("ptk,pt->pk", w * w, noise)  # w_kᵀ D w_k
    return (task * spatial + diagonal * squares).sum(-1)


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
    forms = _column_forms(schur, task_covariance, noise, factors)
    correction = -0.5 * schur.logdet_c + 0.5 * schur.n_missing_values * math.log(2.0 * math.pi)
    return full + correction + 0.5 * (forms - forms.detach())


class SchurPosterior(GridPosterior):
    """Posterior of a model fitted to a grid with a few missing pixels (exact).

    The mean is the full-grid posterior mean for the completed maps ``ȳ(z*)``; the
    variance adds back ``Σ_k (B w_k)_t² Σ_j (k*ᵀ h_kj)²`` for what the missing pixels
    do not tell.

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
            # (B w_k)_t², (P, T, T): how much of whitened map k's increase map t gets.
            self.task_gains = (model.task_covariance @ schur.task_weights).pow(2)
        super().__init__(model, completed, solve=schur.grid_solve.with_targets(schur.completed))
        self.columns = schur.columns  # (P, *fg, T, m)

    def predict(self, test_coords: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and variance ``(P, m_1, ..., m_d, T)`` on the grid of ``test_coords``."""
        mean, variance = super().predict(test_coords)
        with torch.no_grad():
            cross = self.model.kernel.cross_factors(self.lengthscale, test_coords)
            h = self.columns
            p, *fg, t, m = h.shape
            kh = kron_dot(h.reshape(p, *fg, t * m), cross).reshape(p, -1, t, m)  # k*ᵀ h_kj, (P, m*, T, m)
            increase = kh.pow(2).sum(-1) @ self.task_gains.transpose(-1, -2)  # Σ_k (B w_k)_t² Σ_j (k*ᵀ h_kj)²
        return mean, variance + increase.reshape(variance.shape)

    def default_chunk_rows(self, test_coords: Sequence[torch.Tensor]) -> int:
        """Rows per chunk keeping the ``k*ᵀ H`` temporaries under :data:`~hyperspy_gp.gp.prediction.DEFAULT_CHUNK_BYTES`."""
        rows = super().default_chunk_rows(test_coords)
        p, t, m = self.columns.shape[0], self.columns.shape[-2], self.columns.shape[-1]
        per_row = math.prod(len(c) for c in test_coords[1:]) * p * t * m * 8 * 3
        return max(1, min(rows, DEFAULT_CHUNK_BYTES // max(per_row, 1)))


def _symmetrised(matrix: torch.Tensor, block: int) -> torch.Tensor:
    """``(A + Aᵀ) / 2`` in place, a block at a time (no second ``|M| × |M|`` matrix)."""
    m = matrix.shape[-1]
    for i in range(0, m, block):
        for j in range(0, i + 1, block):
            lower, upper = matrix[..., i : i + block, j : j + block], matrix[..., j : j + block, i : i + block]
            mean = 0.5 * (lower + upper.transpose(-1, -2))
            lower.copy_(mean)
            upper.copy_(mean.transpose(-1, -2))
    return matrix


def _whitened_complement(q, gains: torch.Tensor, index: torch.Tensor, block: int) -> torch.Tensor:
    """``C_k = (Q diag(g_k) Qᵀ)_{MM}`` ``(P, m, m)``, built a block of columns at a time, symmetrised in place."""
    m = index.shape[0]
    c = gains.new_empty(gains.shape[0], m, m)
    for start in range(0, m, block):
        rotated = kron_rows(q, index[start : start + block]).movedim(1, -1)  # Qᵀ e_i, (P, *fg, b)
        c[..., start : start + block] = _gather(kron_dot(gains[..., None] * rotated, q), index)
    return _symmetrised(c, block)


def squared_test_products(chol: torch.Tensor, index: torch.Tensor, field_shape: Sequence[int], project,
                          block: int) -> torch.Tensor:
    """``Σ_j (project(E L^{-T} e_j))²`` ``(P, *test)``: the columns of ``L^{-T}`` placed at the pixels ``index``.

    ``project`` maps fields ``(P, *field_shape, b)`` to the test grid, ``(P, *test, b)``.
    Columns ``J`` of ``L^{-T}`` (upper triangular) are zero below row ``max J``, so only
    the leading block of ``L`` is solved (``Σ_J (max J)² |J| ≈ |M|³ / 3`` in all).
    """
    m, squares = index.shape[0], None
    for start in range(0, m, block):
        stop = min(start + block, m)
        unit = chol.new_zeros(chol.shape[0], stop, stop - start)
        unit[:, torch.arange(start, stop), torch.arange(stop - start)] = 1.0  # columns J of the identity
        y = torch.linalg.solve_triangular(chol[:, :stop, :stop].transpose(-1, -2), unit, upper=True)
        fields = y.new_zeros(chol.shape[0], *field_shape, y.shape[-1])
        fields[(slice(None), *index[:stop].T)] = y
        part = project(fields).pow(2).sum(-1)
        squares = part if squares is None else squares + part
    return squares


def streamed_increase(solve: GridICMSolve, task_covariance: torch.Tensor,
                      index: torch.Tensor, rotated_cross: Sequence[torch.Tensor]) -> torch.Tensor:
    """The exact variance increase of :class:`SchurPosterior` on a whole test grid, without its columns.

    For each whitened map ``k`` in turn, ``C_k`` is built a block of columns at a time
    (:data:`~hyperspy_gp.memory.STREAM_BLOCK` missing pixels) and factorised, and
    ``k*ᵀ H_k = (Qᵀ k*)ᵀ diag(g_k) Qᵀ E_M L_k^{-T}`` is formed for a block of columns of
    ``L_k^{-T}`` at a time.  So the memory is ``2 |M|²`` (``C_k``, symmetrised in place,
    and its factor; then the factor and the copy of its leading block that the
    triangular solves make) plus a block of fields, not the ``|M| n T`` of the columns
    ``H``.

    Parameters
    ----------
    solve
        The model's grid solve (eigenbasis, whitened tasks with its jitter).
    task_covariance
        ``B`` ``(P, T, T)``.
    index
        ``(m, n_factors)`` factor-layout coordinates of the missing pixels.
    rotated_cross
        The test grid's cross-covariance factors times the eigenvectors, ``k_a Q_a``.

    Returns
    -------
    torch.Tensor
        ``(P, *test, T)`` in factor layout: ``Σ_k (B w_k)_t² Σ_j (k*ᵀ h_kj)²``.
    """
    with torch.no_grad():
        q, lam = solve.eigenvectors, solve.eigenvalues_grid
        root, gamma, rotation = solve.whitening
        task_gains = (task_covariance @ (rotation / root[:, :, None])).pow(2)  # (B w_k)_t², (P, T, T)
        block, increase = memory.STREAM_BLOCK, None
        for k in range(gamma.shape[-1]):
            gains = 1.0 / (lam * gamma[:, k].reshape(-1, *([1] * (lam.dim() - 1))) + 1.0)  # (P, *fg)
            chol, _ = safe_cholesky(_whitened_complement(q, gains, index, block))  # C_k freed once factorised
            def project(fields, gains=gains):  # k*ᵀ Q diag(g_k) Qᵀ: the columns h_kj on the test grid
                return kron_dot(kron_dot(fields, [a.transpose(-1, -2) for a in q]) * gains[..., None], rotated_cross)

            squares = squared_test_products(chol, index, gains.shape[1:], project, block)
            del chol
            gain = task_gains[:, :, k].reshape(-1, *([1] * (squares.dim() - 1)), task_gains.shape[1])
            term = squares[..., None] * gain
            increase = term if increase is None else increase + term
    return increase
