r"""Coarse-space correction of the Schur complement by CG, for large masked regions.

The block-Jacobi preconditioner ``J`` of :class:`~hyperspy_gp.gp.schur_iterative.MaskedOperator`
equalises ``C = (Σ^{-1})_{MM}`` within tiles of neighbouring pixels.  Deep inside a
large connected masked region (a navigation mask over vacuum, a cropped-out artefact)
``C`` also has smooth modes, spread over many tiles, which ``J`` does not see; with
long length scales and low noise CG then needs thousands of iterations.  The smooth
functions are the kernel's own columns, so the coarse space is spanned by the kernel
columns at *coarse points* (a lattice of missing pixels whose neighbours are all
missing, :func:`coarse_points`), restricted to the missing pixels, one copy per map:
``Z = orth((K E_c)_M) ⊗ I_T``, ``r = c T`` columns.  The additive two-level
preconditioner

.. math::  P^{-1} = J^{-1} + Z E^{-1} Zᵀ, \qquad E = Zᵀ C Z,

keeps what the likelihood estimate needs exact, with ``r × r`` algebra only
(``J = L Lᵀ``, ``F = Zᵀ J Z``, Woodbury and the determinant lemma).  It is worked in
the whitened map coordinates of the operator (``C = (W ⊗ I) diag_k(C_k) (W ⊗ I)ᵀ``,
see :class:`~hyperspy_gp.gp.schur_iterative.MaskedOperator`): there ``Z`` spans the
same space (``W`` acts pixel by pixel), and ``E``, ``F`` and every matrix below are
block-diagonal over the ``T`` whitened maps, ``c × c`` blocks instead of one ``cT × cT``
matrix, so the memory cap allows ``√T`` times more coarse points.  In those
coordinates:

- ``\log\det P = \log\det J + \log\det E - \log\det(E + F)``;
- a factor ``P = Φ Φᵀ``: ``P = L (I - V Vᵀ) Lᵀ`` with ``V = Lᵀ Z A``, ``A Aᵀ = (E + F)^{-1}``;
  with ``G = VᵀV = U diag(g) Uᵀ``, ``Φ = L (I - V X Vᵀ)``, ``X = U diag(1 / (1 + √(1 - g))) Uᵀ``,
  so ``Φ ε = L ε - J Z Y Zᵀ L ε`` with ``Y = A X Aᵀ``;
- ``Φ^{-T} ε = L^{-T} ε + Z Y' Zᵀ L ε``, ``Y' = A X' Aᵀ``, ``X' = U diag(x / √(1 - g)) Uᵀ``.

Measured (one map, 48², a masked quarter disc of 1633 pixels, ``r`` = 374; CG
iterations of one likelihood evaluation, tiles alone → with the coarse space): ℓ = 3 px,
noise 1e-6: 501 → 162; ℓ = 6 px, noise 1e-4: no convergence in 1000 → 136; ℓ = 6 px,
noise 1e-6: no convergence → 591.  Scattered missing pixels have no coarse points, and
nothing changes for them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hyperspy_gp.gp.cholesky import safe_cholesky
from hyperspy_gp.gp.tensor import kron_dot
from hyperspy_gp.memory import CHUNK_BYTES, COARSE_BASIS_VALUES, COARSE_MATRIX_VALUES

#: Smallest spacing of the coarse lattice, in pixels (every other pixel).
MIN_COARSE_SPACING = 2


def coarse_points(observed: np.ndarray, n_models: int, n_tasks: int) -> np.ndarray:
    """Which missing pixels are coarse points: a lattice deep inside the masked regions.

    A coarse point is a missing pixel whose neighbours (all pixels within one step
    along every axis, diagonals included) are missing too, on a lattice of every
    ``s``-th pixel; ``s`` starts at :data:`MIN_COARSE_SPACING` and grows until the coarse
    space fits :data:`~hyperspy_gp.memory.COARSE_MATRIX_VALUES` and
    :data:`~hyperspy_gp.memory.COARSE_BASIS_VALUES` (none when no spacing does).
    Scattered missing pixels have observed neighbours, hence no coarse points.

    Parameters
    ----------
    observed
        Boolean mask of the measured pixels on the fitted grid.
    n_models, n_tasks
        Models ``P`` and maps ``T`` per model.

    Returns
    -------
    numpy.ndarray
        Boolean, one value per missing pixel in C order (the order of
        ``GridICMModel.missing_index``).

    Examples
    --------
    >>> observed = np.ones((12, 12), dtype=bool)
    >>> observed[2:9, 2:9] = False  # a 7 × 7 masked region: interior rows and columns 3…7
    >>> int(coarse_points(observed, 1, 1).sum())  # the even ones: (4, 4), (4, 6), (6, 4), (6, 6)
    4
    >>> observed = np.random.default_rng(0).random((12, 12)) > 0.2  # scattered
    >>> int(coarse_points(observed, 1, 1).sum())
    0
    """
    from scipy.ndimage import binary_erosion

    missing = ~np.asarray(observed, dtype=bool)
    deep = binary_erosion(missing, structure=np.ones((3,) * missing.ndim, dtype=bool), border_value=1)
    n_missing = int(missing.sum())
    for spacing in range(MIN_COARSE_SPACING, max(deep.shape) + 1):
        lattice = np.ones_like(deep)
        for axis, n in enumerate(deep.shape):
            on_axis = np.arange(n) % spacing == 0
            lattice &= on_axis.reshape([-1 if a == axis else 1 for a in range(deep.ndim)])
        chosen = deep & lattice
        count = int(chosen.sum())
        fits = n_models * n_tasks * count**2 <= COARSE_MATRIX_VALUES  # T blocks of c × c
        if fits and n_models * n_missing * count <= COARSE_BASIS_VALUES:
            return chosen[missing]
    return np.zeros(n_missing, dtype=bool)


class CoarseCorrection:
    """The two-level preconditioner ``P^{-1} = J^{-1} + Z E^{-1} Zᵀ`` (see the module docstring).

    Same interface as the block-Jacobi one of
    :class:`~hyperspy_gp.gp.schur_iterative.MaskedOperator`: ``precondition``,
    ``factor``, ``factor_inv_t`` and ``logdet_preconditioner``, on ``(P, R, T, m)``
    vectors; inside, whitened map coordinates with ``(P, T, c, c)`` blocks.

    Parameters
    ----------
    operator
        The :class:`~hyperspy_gp.gp.schur_iterative.MaskedOperator` (``C`` and ``J``).
    factors
        The kernel factors ``(P, n_a, n_a)``.
    coarse_index
        ``(c, n_factors)`` factor-layout coordinates of the coarse points.
    """

    def __init__(self, operator, factors, coarse_index: torch.Tensor) -> None:
        self.op = operator
        with torch.no_grad():
            columns = math.prod(  # K(x_i, x_c) for missing i and coarse c, (P, m, c)
                f[:, operator.index[:, a]][:, :, coarse_index[:, a]] for a, f in enumerate(factors)
            )
            self.basis, _ = torch.linalg.qr(columns)  # orthonormal: the span is what counts
            self.n_tasks = operator.inverse_blocks.shape[-1]
            e = self._coarse_inverse_covariance()  # Zᵀ diag_k(C_k) Z, (P, T, c, c)
            f = self._coarse_matrix(operator.block_apply)  # Zᵀ diag_k(J_k) Z
            chol_e, jitter = safe_cholesky(e)  # E + jitter I: still a valid preconditioner
            inverse = torch.cholesky_inverse(chol_e)  # a product per CG step, not two triangular solves
            self.e_inverse = 0.5 * (inverse + inverse.transpose(-1, -2))
            e = e + jitter[:, None, None, None] * torch.eye(e.shape[-1], dtype=e.dtype, device=e.device)
            chol_ef, _ = safe_cholesky(e + f)
            # G = R⁻¹ F R⁻ᵀ with E + F = R Rᵀ, A = R⁻ᵀ: eigenvalues in [0, 1).
            g_matrix = torch.linalg.solve_triangular(chol_ef, f, upper=False)
            g_matrix = torch.linalg.solve_triangular(chol_ef, g_matrix.transpose(-1, -2), upper=False)
            g, u = torch.linalg.eigh(0.5 * (g_matrix + g_matrix.transpose(-1, -2)))
            root = (1.0 - g).clamp_min(torch.finfo(g.dtype).eps).sqrt()  # √(1 - g)
            x = 1.0 / (1.0 + root)
            w = torch.linalg.solve_triangular(chol_ef.transpose(-1, -2), u, upper=True)  # A U
            self.factor_weights = (w * x.unsqueeze(-2)) @ w.transpose(-1, -2)  # Y
            self.factor_inv_t_weights = (w * (x / root).unsqueeze(-2)) @ w.transpose(-1, -2)  # Y'
            diag = torch.diagonal
            logdet_ratio = 2.0 * (torch.log(diag(chol_e, dim1=-2, dim2=-1)).sum(-1)
                                  - torch.log(diag(chol_ef, dim1=-2, dim2=-1)).sum(-1))
            self._logdet_ratio = logdet_ratio.sum(-1)  # over the whitened maps

    @property
    def n_values(self) -> int:
        """Columns ``r = c T`` of the coarse space."""
        return self.basis.shape[-1] * self.n_tasks

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """``Z y``: ``(P, r, R)`` (rows ordered map by map) → ``(P, R, T, m)``."""
        p, _, r = y.shape
        return torch.einsum("pmc,ptcr->prtm", self.basis, y.reshape(p, self.n_tasks, -1, r))

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """``Zᵀ v``: ``(P, R, T, m)`` → ``(P, r, R)``."""
        p, r = v.shape[:2]
        return torch.einsum("pmc,prtm->ptcr", self.basis, v).reshape(p, -1, r)

    def _blocks(self, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``Z diag_k(weights_k) Zᵀ v`` for ``(P, T, c, c)`` weights and whitened ``v``."""
        p, r = v.shape[:2]
        y = weights @ self.project(v).reshape(p, self.n_tasks, -1, r)
        return self.lift(y.reshape(p, -1, r))

    def _coarse_matrix(self, apply) -> torch.Tensor:
        """``Zᵀ A Z`` per whitened map, ``(P, T, c, c)``, for ``apply`` acting map by map on whitened ``(P, R, T, m)``.

        Each batch of unit columns is lifted for every map at once.
        """
        p, m, c = self.basis.shape
        t = self.n_tasks
        grid_values = max(math.prod(self.op.grid_shape()), m) * t * p
        batch = max(1, CHUNK_BYTES // (4 * grid_values * self.basis.element_size()))
        out = self.basis.new_empty(p, t, c, c)
        for start in range(0, c, batch):
            stop = min(start + batch, c)
            unit = self.basis.new_zeros(p, t, c, stop - start)
            unit[:, :, start:stop] = torch.eye(stop - start, dtype=unit.dtype, device=unit.device)
            columns = apply(self.lift(unit.reshape(p, t * c, -1)))
            out[..., start:stop] = self.project(columns).reshape(p, t, c, -1)
        return 0.5 * (out + out.transpose(-1, -2))

    def _coarse_inverse_covariance(self) -> torch.Tensor:
        """``E_k = Zᵀ C_k Z`` per whitened map, ``(P, T, c, c)``, from the rotated basis.

        With ``V = Qᵀ E_M Z_c`` (the coarse basis rotated into the eigenbasis, ``(P, n, c)``)
        and the whitened weights ``h_{jk}``, ``E_k = Vᵀ diag(h_k) V``: ``T`` products of
        ``n × c`` matrices (128² × 6, ``c`` = 269: 0.6 s where ``2 c T`` structured
        products took 4.8 s).
        """
        op, basis = self.op, self.basis
        p, _, c = basis.shape
        rotated = kron_dot(op.scatter(basis.transpose(-1, -2).unsqueeze(2)),
                           [q.transpose(-1, -2) for q in op.eigenvectors]).reshape(p, -1, c)  # (P, n, c)
        weights = op.whitened_weights.reshape(p, -1, self.n_tasks)
        out = torch.stack([rotated.transpose(1, 2) @ (weights[:, :, k, None] * rotated)
                           for k in range(self.n_tasks)], 1)
        return 0.5 * (out + out.transpose(-1, -2))

    def precondition(self, r: torch.Tensor) -> torch.Tensor:
        """``P^{-1} r = (W^{-T} ⊗ I) (diag_k(J_k^{-1}) + Z E^{-1} Zᵀ) (W^{-1} ⊗ I) r``."""
        y = self.op.whiten(r)
        return self.op.unwhiten_t(self.op.block_solve(y) + self._blocks(self.e_inverse, y))

    def factor(self, eps: torch.Tensor) -> torch.Tensor:
        """``Φ ε`` with ``Φ Φᵀ = P``: probes with covariance ``P``."""
        le = self.op.block_factor(eps)
        return self.op.unwhiten(le - self.op.block_apply(self._blocks(self.factor_weights, le)))

    def factor_inv_t(self, eps: torch.Tensor) -> torch.Tensor:
        """``Φ^{-T} ε`` (``= P^{-1} Φ ε``)."""
        le = self.op.block_factor(eps)
        return self.op.unwhiten_t(self.op.block_factor_inv_t(eps) + self._blocks(self.factor_inv_t_weights, le))

    def logdet_preconditioner(self) -> torch.Tensor:
        """``log det P`` per model, ``(P,)``."""
        return self.op.logdet_preconditioner() + self._logdet_ratio
