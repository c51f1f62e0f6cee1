r"""Exact marginal log likelihood of the grid ICM model, with its analytic gradient.

The model for ``T`` maps on a grid of ``n`` pixels, stacked task-major, is

.. math::

    y \sim \mathcal N(0, \Sigma), \qquad
    \Sigma = B \otimes K + D \otimes I_n, \qquad K = K_1 \otimes \dots \otimes K_d,

with ``B`` the ``T × T`` task (coregionalization) covariance, ``D = diag(σ²_t)`` the
per-map noise and ``K_a`` the spatial covariance factors (one per scan axis for a
separable kernel; a single dense factor otherwise).  With ``K_a = Q_a Λ_a Q_aᵀ`` and
``Q = ⊗ Q_a``, rotating every map into the spatial eigenbasis block-diagonalises
``Σ`` into ``n`` independent ``T × T`` blocks

.. math::  S_j = λ_j B + D, \qquad λ_j = \prod_a λ_{a, j_a},

so that, with ``ỹ_j = (Qᵀ Y)_j`` and ``α̃_j = S_j^{-1} ỹ_j``,

.. math::

    \log p(y) = -\tfrac12 \sum_j \left(ỹ_jᵀ α̃_j + \log\det S_j\right)
                - \tfrac{nT}{2}\log 2π .

The blocks are solved in the whitened task basis of :func:`whiten_tasks`: with
``D^{-1/2} B D^{-1/2} = R Γ Rᵀ`` (one ``T × T`` eigendecomposition per model),
``S_j = U diag_k(λ_j γ_k + 1) Uᵀ`` with ``U = √D R``, so ``log det S_j`` and
``S_j^{-1} ỹ_j`` are sums over ``k`` and two GEMMs over the grid; no block is formed
or factorised (at 256² × 12 maps the batched Cholesky factorisation and solve of
the ``n`` blocks took 30 % of an evaluation).  Where the blocks are ill-conditioned
enough that their Cholesky factorisation could fail (:data:`WHITENED_ROUNDING_LIMIT`)
they are factorised instead, and when round-off makes some ``S_j`` numerically
indefinite the same jitter ``εI`` is added to every block
(:mod:`~hyperspy_gp.gp.cholesky`), i.e. ``Σ + εI`` is used and ``ε`` is reported in
:attr:`GridICMSolve.jitter`.

Cost: ``O(Σ_a n_a³ + n Σ_a n_a T + n T² + T³)`` time, ``O(n T)`` memory (``O(n T²)``
where the blocks are factorised).  No ``nT × nT`` matrix is ever formed.

The gradient is implemented analytically (:class:`GridICMLogLikelihood`) rather than
by back-propagating through ``torch.linalg.eigh``: eigenvector derivatives contain
``1/(λ_i − λ_j)`` and are NaN wherever eigenvalues repeat (square grids with equal
length scales, long length scales), although the likelihood itself is smooth there.
With ``α = Σ^{-1} y`` reshaped to maps ``A_t`` and ``M_j = S_j^{-1}``:

- ``∂L/∂B = ½ Σ_j λ_j (α̃_j α̃_jᵀ − M_j)``
- ``∂L/∂σ²_t = ½ Σ_j (α̃_{jt}² − (M_j)_{tt})``
- ``∂L/∂K_a = ½ Σ_{st} B_{st} A_s ×_{b≠a} K_b A_tᵀ − ½ Q_a diag(w_a) Q_aᵀ`` with
  ``w_{a,i} = Σ_{j: j_a = i} tr(M_j B) Π_{b≠a} λ_{b,j_b}``.

The sums over ``M_j`` are taken in the whitened task basis (:func:`whiten_tasks`,
``M_j = V diag_k(1 / (λ_j γ_k + 1)) Vᵀ``), so no ``M_j`` is formed.
Every term is invariant to the choice of eigenbasis inside a degenerate eigenspace,
so the gradient is finite and exact where ``eigh``'s backward is not.  Gradients then
flow from the factors ``K_a`` to the length scales by ordinary autograd.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from hyperspy_gp.gp.cholesky import safe_cholesky
from hyperspy_gp.gp.tensor import kron_dot, kron_outer, sum_except_axis


#: Largest ``(λ_max ‖B‖ + max D) / min D`` times ``4 T² ε`` at which the blocks are
#: solved in the whitened task basis: below it every ``S_j`` is far enough from
#: singular that its Cholesky factorisation cannot fail (``λ_min(S_j) ≥ min D``), so
#: no jitter would be added and the two ways compute the same numbers.  Beyond it the
#: blocks are factorised, with jitter where round-off needs it (:mod:`~hyperspy_gp.gp.cholesky`).
WHITENED_ROUNDING_LIMIT = 1.0


@dataclass
class GridICMSolve:
    """Everything the likelihood, its gradient and the predictions share.

    Shapes use ``P`` (batch of models), the grid ``(n_1, ..., n_d)`` and ``T`` maps.
    The blocks ``S_j = λ_j B + D`` are solved in the whitened task basis
    (:func:`whiten_tasks`: ``S_j = U diag_k(λ_j γ_k + 1) Uᵀ``), ``n × T`` numbers, or
    where they are too ill-conditioned for that to be safe
    (:data:`WHITENED_ROUNDING_LIMIT`), by their Cholesky factors.
    """

    eigenvectors: list[torch.Tensor]  # Q_a, (P, n_a, n_a)
    eigenvalues: list[torch.Tensor]  # λ_a, (P, n_a), clamped at 0
    eigenvalues_grid: torch.Tensor  # λ_j, (P, n_1, ..., n_d)
    rotated_targets: torch.Tensor  # ỹ, (P, n_1, ..., n_d, T)
    rotated_weights: torch.Tensor  # α̃ = S⁻¹ ỹ, (P, n_1, ..., n_d, T)
    jitter: torch.Tensor  # (P,) added to every S_j when round-off needed it, else 0
    logdet: torch.Tensor  # Σ_j log det S_j, (P,)
    task_covariance: torch.Tensor  # B, (P, T, T)
    noise: torch.Tensor  # D, (P, T), without the jitter
    #: chol(S_j), (P, n_1, ..., n_d, T, T): the solve's where it factorised the blocks,
    #: else ``None`` until :attr:`cholesky` forms it.
    block_cholesky: torch.Tensor | None = None

    @property
    def whitening(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`whiten_tasks` of ``B`` and ``D`` with the jitter."""
        return whiten_tasks(self.task_covariance, self.noise + self.jitter[:, None])

    @property
    def cholesky(self) -> torch.Tensor:
        """``chol(S_j)``, ``(P, n_1, ..., n_d, T, T)`` (formed on first use where the solve did not need it)."""
        if self.block_cholesky is None:
            with torch.no_grad():
                self.block_cholesky = torch.linalg.cholesky(
                    icm_blocks(self.eigenvalues_grid, self.task_covariance, self.noise + self.jitter[:, None]))
        return self.block_cholesky

    def block_inverse(self) -> torch.Tensor:
        """``M_j = S_j^{-1}`` for every spatial eigenvalue, ``(P, n.., T, T)``."""
        return torch.cholesky_inverse(self.cholesky)

    def with_targets(self, targets: torch.Tensor) -> GridICMSolve:
        """The same factorisation solved for other ``(P, n_1, ..., n_d, T)`` targets (no autograd).

        Reuses the eigendecompositions and the blocks' factors: only the rotation of
        the targets and the block solves are redone.
        """
        with torch.no_grad():
            rotated = _rotate(targets, self.eigenvectors)
            if self.block_cholesky is None:
                weights = _whitened_solve(rotated, self.eigenvalues_grid, self.whitening)
            else:
                weights = torch.cholesky_solve(rotated.unsqueeze(-1), self.block_cholesky).squeeze(-1)
        return dataclasses.replace(self, rotated_targets=rotated, rotated_weights=weights)


def _rotate(targets: torch.Tensor, eigenvectors: list[torch.Tensor]) -> torch.Tensor:
    """``ỹ = (Q_1 ⊗ ... ⊗ Q_d)ᵀ y``."""
    return kron_dot(targets, [q.transpose(-1, -2) for q in eigenvectors])


def icm_blocks(lam_grid: torch.Tensor, task_covariance: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
    """``S_j = λ_j B + diag(diagonal)`` for every ``λ_j`` of ``lam_grid`` ``(P, *grid)``, ``(P, *grid, T, T)``."""
    view = (task_covariance.shape[0], *([1] * (lam_grid.dim() - 1)), *task_covariance.shape[1:])
    return lam_grid[..., None, None] * task_covariance.reshape(view) + torch.diag_embed(diagonal).reshape(view)


def _whitened_solve(rotated: torch.Tensor, lam_grid: torch.Tensor, whitening) -> torch.Tensor:
    """``α̃_j = S_j^{-1} ỹ_j = V diag_k(1 / (λ_j γ_k + 1)) Vᵀ ỹ_j`` with ``V = D^{-1/2} R``: two GEMMs over the grid."""
    root, gamma, rotation = whitening
    v = rotation / root[:, :, None]  # (P, T, K)
    p, t = rotated.shape[0], rotated.shape[-1]
    whitened = rotated.reshape(p, -1, t) @ v  # (P, n, K)
    whitened /= lam_grid.reshape(p, -1, 1) * gamma[:, None, :] + 1.0
    return (whitened @ v.transpose(-1, -2)).reshape(rotated.shape)


def _whitened_logdet(lam_grid: torch.Tensor, whitening) -> torch.Tensor:
    """``Σ_j log det S_j = n Σ_t log D_t + Σ_{j,k} log(1 + λ_j γ_k)``, ``(P,)``."""
    root, gamma, _ = whitening
    p, n = lam_grid.shape[0], lam_grid[0].numel()
    spectral = torch.log1p(lam_grid.reshape(p, -1, 1) * gamma[:, None, :]).sum(dim=(1, 2))
    return 2.0 * n * torch.log(root).sum(-1) + spectral


def _whitening_is_safe(lam_grid: torch.Tensor, task_covariance: torch.Tensor, noise: torch.Tensor) -> bool:
    """Whether every block is well enough conditioned to be solved whitened (:data:`WHITENED_ROUNDING_LIMIT`)."""
    if not (torch.isfinite(task_covariance).all() and torch.isfinite(noise).all() and torch.isfinite(lam_grid).all()):
        return False  # the factorisation reports it
    t = task_covariance.shape[-1]
    largest = lam_grid.reshape(lam_grid.shape[0], -1).amax(-1) * torch.linalg.matrix_norm(task_covariance, ord=2)
    spread = (largest + noise.amax(-1)) / noise.amin(-1)
    rounding = 4 * t * t * torch.finfo(noise.dtype).eps
    return bool((noise.amin(-1) > 0).all() and (spread * rounding < WHITENED_ROUNDING_LIMIT).all())


def solve_grid_icm(
    targets: torch.Tensor,
    task_covariance: torch.Tensor,
    noise: torch.Tensor,
    factors: list[torch.Tensor],
) -> GridICMSolve:
    """Diagonalise the spatial factors and solve the ``T × T`` blocks (no autograd).

    Parameters
    ----------
    targets
        ``(P, n_1, ..., n_d, T)`` observed maps.
    task_covariance
        ``(P, T, T)`` symmetric positive semi-definite ``B``.
    noise
        ``(P, T)`` positive noise variances.
    factors
        Spatial covariance factors ``(P, n_a, n_a)``, one per factor axis.
    """
    with torch.no_grad():
        task_covariance, noise = task_covariance.detach(), noise.detach()
        eigenvalues, eigenvectors = [], []
        for factor in factors:
            lam, vec = torch.linalg.eigh(factor)
            # Kernel matrices are PSD; round-off can make tiny eigenvalues negative.
            eigenvalues.append(lam.clamp_min(0.0))
            eigenvectors.append(vec)
        lam_grid = kron_outer(eigenvalues)
        rotated = _rotate(targets, eigenvectors)
        if _whitening_is_safe(lam_grid, task_covariance, noise):
            jitter = noise.new_zeros(noise.shape[0])
            whitening = whiten_tasks(task_covariance, noise)
            weights = _whitened_solve(rotated, lam_grid, whitening)
            logdet, chol = _whitened_logdet(lam_grid, whitening), None
        else:
            chol, jitter = safe_cholesky(icm_blocks(lam_grid, task_covariance, noise))
            weights = torch.cholesky_solve(rotated.unsqueeze(-1), chol).squeeze(-1)
            diagonal = torch.diagonal(chol, dim1=-2, dim2=-1)
            logdet = 2.0 * torch.log(diagonal).reshape(diagonal.shape[0], -1).sum(-1)
    return GridICMSolve(eigenvectors, eigenvalues, lam_grid, rotated, weights, jitter, logdet, task_covariance, noise,
                        chol)


def whiten_tasks(task_covariance: torch.Tensor, diagonal: torch.Tensor):
    """``√D``, ``Γ`` and ``R`` with ``R Γ Rᵀ = D^{-1/2} B D^{-1/2}``: ``λ B + D = U diag(λ γ_k + 1) Uᵀ``, ``U = √D R``.

    ``task_covariance`` ``B`` ``(P, T, T)``, ``diagonal`` ``D`` ``(P, T)`` (the noise with
    any jitter the blocks got).  For preconditioners, never differentiated: repeated
    eigenvalues (identical maps, rank-deficient ``B``) are harmless.
    """
    with torch.no_grad():
        root = diagonal.sqrt()
        gamma, rotation = torch.linalg.eigh(task_covariance / (root[:, :, None] * root[:, None, :]))
    return root, gamma.clamp_min(0.0), rotation


def whitened_variance_reduction(whitening, eigenvalues: torch.Tensor) -> torch.Tensor:
    """``(B (λ B + D)^{-1} B)_tt = Σ_k U_tk² γ_k² / (λ γ_k + 1)`` for every ``λ`` of ``eigenvalues`` ``(P, *)``.

    ``whitening`` is what :func:`whiten_tasks` returns (``U = √D R``): a sum of positive
    terms, each to full precision, where the inverse blocks would lose ``cond(λ B + D)``
    digits (:func:`~hyperspy_gp.gp.prediction._variance_weights`).

    Returns
    -------
    torch.Tensor
        ``(P, *, T)``.
    """
    root, gamma, rotation = whitening
    loadings = (root[:, :, None] * rotation).pow(2)  # U_tk², (P, T, K)
    lam = eigenvalues.unsqueeze(-1)
    gamma = gamma.reshape(gamma.shape[0], *([1] * (lam.dim() - 2)), gamma.shape[-1])
    return torch.einsum("p...k,ptk->p...t", gamma.pow(2) / (lam * gamma + 1.0), loadings)


def _log_likelihood(solve: GridICMSolve) -> torch.Tensor:
    spatial_dims = tuple(range(1, solve.rotated_targets.dim()))
    quad = (solve.rotated_targets * solve.rotated_weights).sum(dim=spatial_dims)
    n_obs = solve.rotated_targets[0].numel()
    return -0.5 * (quad + solve.logdet + n_obs * math.log(2.0 * math.pi))


class GridICMLogLikelihood(torch.autograd.Function):
    """``log p(y)`` per model in the batch, differentiable in ``B``, ``σ²`` and ``K_a``."""

    @staticmethod
    def forward(ctx, targets, task_covariance, noise, *factors):  # noqa: D102
        solve = solve_grid_icm(targets, task_covariance, noise, list(factors))
        ctx.solve = solve
        ctx.save_for_backward(task_covariance, *factors)
        return _log_likelihood(solve)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        task_covariance, *factors = ctx.saved_tensors
        solve: GridICMSolve = ctx.solve
        grads = _analytic_gradients(solve, task_covariance, factors)
        scale = grad_output.reshape(-1, 1, 1)
        grad_b = grads["task_covariance"] * scale
        grad_noise = grads["noise"] * grad_output.reshape(-1, 1)
        grad_factors = [g * scale for g in grads["factors"]]
        return (None, grad_b, grad_noise, *grad_factors)


def _block_inverse_sums(solve: GridICMSolve):
    """``Σ_j λ_j M_j`` ``(P, T, T)``, ``Σ_j diag(M_j)`` ``(P, T)`` and ``tr(M_j B)`` ``(P, *grid)``.

    In the whitened task basis of :func:`whiten_tasks` (``V = D^{-1/2} R``, ``D`` with the
    blocks' jitter) ``M_j = V diag_k(d_{jk}) Vᵀ`` with ``d_{jk} = 1 / (λ_j γ_k + 1)`` and
    ``Vᵀ B V = Γ``: every sum is over ``n × T`` numbers, and no ``M_j`` is formed (they
    would be ``n T²`` numbers from a batched inverse of ``n`` tiny blocks; at 256² × 12
    maps that and its einsum took a third of an evaluation).
    """
    root, gamma, rotation = solve.whitening
    v = rotation / root[:, :, None]  # (P, T, K)
    lam = solve.eigenvalues_grid.reshape(gamma.shape[0], -1, 1)  # (P, n, 1)
    d = (lam * gamma[:, None, :]).add_(1.0).reciprocal_()  # d_jk, (P, n, K)
    weighted = (lam * d).sum(1)  # Σ_j λ_j d_jk, (P, K)
    sum_lam_m = (v * weighted[:, None, :]) @ v.transpose(-1, -2)
    sum_diag_m = v.pow(2) @ d.sum(1).unsqueeze(-1)
    trace_mb = (d @ gamma.unsqueeze(-1)).reshape(solve.eigenvalues_grid.shape)
    return sum_lam_m, sum_diag_m.squeeze(-1), trace_mb


def _analytic_gradients(solve: GridICMSolve, task_covariance, factors) -> dict:
    lam = solve.eigenvalues_grid
    alpha_t = solve.rotated_weights
    spatial_dims = tuple(range(1, lam.dim()))
    sum_lam_m, sum_diag_m, trace_mb = _block_inverse_sums(solve)

    # Σ_j λ_j α̃_j α̃_jᵀ as one GEMM over the grid (einsum's path was 20× slower: 256² × 12).
    flat = alpha_t.reshape(alpha_t.shape[0], -1, alpha_t.shape[-1])
    weighted_outer = (flat * lam.reshape(lam.shape[0], -1, 1)).transpose(-1, -2) @ flat
    grad_b = 0.5 * (weighted_outer - sum_lam_m)
    grad_noise = 0.5 * (alpha_t.pow(2).sum(dim=spatial_dims) - sum_diag_m)

    alpha = kron_dot(alpha_t, solve.eigenvectors)  # Σ⁻¹ y in the pixel basis
    grad_factors = []
    for axis, (q, factor) in enumerate(zip(solve.eigenvectors, factors)):
        # Log-determinant part: −½ Q_a diag(w_a) Q_aᵀ.
        others = [None if b == axis else lam_b for b, lam_b in enumerate(solve.eigenvalues)]
        weight = trace_mb  # tr(M_j B), the weights of the log-determinant term
        for b, lam_b in enumerate(others):
            if lam_b is not None:
                weight = weight * lam_b.reshape(lam_b.shape[0], *[-1 if i == b else 1 for i in range(len(others))])
        w_axis = sum_except_axis(weight, axis)
        grad_logdet = -0.5 * (q * w_axis.unsqueeze(-2)) @ q.transpose(-1, -2)
        # Data part: ½ Σ_st B_st A_s (×_{b≠a} K_b) A_tᵀ.
        z = kron_dot(alpha, [None if b == axis else k for b, k in enumerate(factors)])
        z = z @ task_covariance.reshape(z.shape[0], *([1] * (z.dim() - 3)), *task_covariance.shape[1:])
        a_unf = alpha.movedim(axis + 1, 1).reshape(alpha.shape[0], alpha.shape[axis + 1], -1)
        z_unf = z.movedim(axis + 1, 1).reshape(z.shape[0], z.shape[axis + 1], -1)
        grad_data = 0.5 * a_unf @ z_unf.transpose(-1, -2)
        grad_factors.append(grad_data + grad_logdet)
    return {"task_covariance": grad_b, "noise": grad_noise, "factors": grad_factors}


def grid_icm_log_likelihood(targets, task_covariance, noise, factors) -> torch.Tensor:
    """Exact ``log p(y)`` of each model in the batch (see the module docstring).

    Parameters
    ----------
    targets
        ``(P, n_1, ..., n_d, T)`` observed (standardised) maps.
    task_covariance
        ``(P, T, T)`` task covariance ``B``.
    noise
        ``(P, T)`` noise variances ``σ²_t``.
    factors
        Spatial covariance factors ``(P, n_a, n_a)``; their product is ``K``.

    Returns
    -------
    torch.Tensor
        ``(P,)`` log marginal likelihoods, differentiable in every argument but
        ``targets``.
    """
    return GridICMLogLikelihood.apply(targets, task_covariance, noise, *factors)


__all__ = ["GridICMSolve", "solve_grid_icm", "grid_icm_log_likelihood", "icm_blocks"]
