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

Only the whitened maps that need it get the coarse space (:func:`coarse_maps`).  In
the whitened coordinates ``C_k = (Q diag(h_k) Qᵀ)_{MM}`` is a principal block of a
matrix with eigenvalues ``h_{jk} = 1 / (λ_j γ_k + 1)``, so its condition number is at
most ``1 + λ_max γ_k``, the signal-to-noise ratio of the whitened map's best-determined
eigenmode: a map with a low ratio has no smooth modes for CG to chase, and its tiles
suffice.  The coarse lattice is sized for the maps that do (:class:`CoarseLattice`):
where one whitened map carries the structure (maps that share one pattern under
different noise) it gets ``√T`` times more coarse points for the same memory.

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
from hyperspy_gp.gp.iterative import active_maps
from hyperspy_gp.gp.tensor import kron_dot
from hyperspy_gp.memory import CHUNK_BYTES, COARSE_BASIS_VALUES, COARSE_MATRIX_VALUES

#: Smallest spacing of the coarse lattice, in pixels (every other pixel).
MIN_COARSE_SPACING = 2
#: Smallest signal-to-noise ratio ``λ_max γ_k`` of a whitened map for which it gets the
#: coarse space (:func:`coarse_maps`).  Measured, one map on a masked quarter disc of
#: 128² (4672 pixels), ℓ = 3.4 × 2.4 px, CG iterations of one evaluation with tiles
#: alone and with the coarse space: ratio 0.46: 7 and 8; 4.6: 16 and 11; 14: 25 and 12;
#: 46: 38 and 13; 460: 92 and 21; 4600: 201 and 40.  Below 10, tiles alone need fewer
#: iterations than the best-determined map of a typical fit does with the coarse space.
COARSE_MIN_SNR = 10.0


def masked_interior(observed: np.ndarray) -> np.ndarray:
    """Missing pixels whose neighbours (diagonals included) are all missing: the inside of masked regions.

    Scattered missing pixels (dead pixels, a random sparse scan) have none; a masked
    region has them, and needs the coarse space (and more CG iterations).

    Examples
    --------
    >>> observed = np.ones((6, 6), dtype=bool)
    >>> observed[1:5, 1:4] = False  # a 4 × 3 region: its two middle pixels
    >>> np.argwhere(masked_interior(observed)).tolist()
    [[2, 2], [3, 2]]
    """
    from scipy.ndimage import binary_erosion

    missing = ~np.asarray(observed, dtype=bool)
    return binary_erosion(missing, structure=np.ones((3,) * missing.ndim, dtype=bool), border_value=1)


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
        Models ``P`` and whitened maps per model that get the coarse space (``T'``,
        :func:`coarse_maps`).

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
    missing = ~np.asarray(observed, dtype=bool)
    deep = masked_interior(observed)
    n_missing = int(missing.sum())
    for spacing in range(MIN_COARSE_SPACING, max(deep.shape) + 1):
        lattice = np.ones_like(deep)
        for axis, n in enumerate(deep.shape):
            on_axis = np.arange(n) % spacing == 0
            lattice &= on_axis.reshape([-1 if a == axis else 1 for a in range(deep.ndim)])
        chosen = deep & lattice
        count = int(chosen.sum())
        fits = n_models * n_tasks * count**2 <= COARSE_MATRIX_VALUES  # T' blocks of c × c
        if fits and n_models * n_missing * count <= COARSE_BASIS_VALUES:
            return chosen[missing]
    return np.zeros(n_missing, dtype=bool)


class CoarseLattice:
    """The coarse points of one mask, for any number of whitened maps that get the coarse space.

    Parameters
    ----------
    observed
        Boolean mask of the measured pixels on the fitted grid.
    n_models
        Models ``P``.
    missing_index
        ``(m, n_factors)`` factor-layout coordinates of the missing pixels, in C order.

    Examples
    --------
    >>> observed = np.ones((70, 70), dtype=bool)
    >>> observed[5:65, 5:65] = False  # a 60 × 60 masked region
    >>> lattice = CoarseLattice(observed, 1, torch.nonzero(torch.as_tensor(~observed)))
    >>> len(lattice.points(1)), len(lattice.points(12))  # every 2nd pixel for one map, every 3rd for 12
    (841, 400)
    """

    def __init__(self, observed: np.ndarray, n_models: int, missing_index: torch.Tensor) -> None:
        self.observed = np.asarray(observed, dtype=bool)
        self.n_models = int(n_models)
        self.missing_index = missing_index
        self._points: dict[int, torch.Tensor | None] = {}

    def points(self, n_maps: int) -> torch.Tensor | None:
        """``(c, n_factors)`` coarse points sized for ``n_maps`` whitened maps (cached), ``None`` if none fit."""
        if n_maps not in self._points:
            chosen = coarse_points(self.observed, self.n_models, n_maps)
            index = torch.as_tensor(chosen, device=self.missing_index.device)
            self._points[n_maps] = self.missing_index[index] if chosen.any() else None
        return self._points[n_maps]


def coarse_maps(operator) -> torch.Tensor:
    """Whitened maps that get the coarse space, ``(P, T')``: those with ``λ_max γ_k`` over :data:`COARSE_MIN_SNR`.

    ``T'`` is the most any model needs (others take their best-determined maps up to
    ``T'``); ``(P, 0)`` when none does.  The ratio is ``1 / min_j h_{jk} - 1`` from the
    operator's whitened weights.
    """
    weights = operator.whitened_weights  # h_jk, (P, *fg, T)
    ratio = 1.0 / weights.flatten(1, -2).amin(1) - 1.0  # λ_max γ_k, (P, T)
    n_maps = int((ratio > COARSE_MIN_SNR).sum(-1).max())
    return ratio.topk(n_maps, dim=-1).indices


class CoarseCorrection:
    """The two-level preconditioner ``P^{-1} = J^{-1} + Z E^{-1} Zᵀ`` (see the module docstring).

    Same interface as the block-Jacobi one of
    :class:`~hyperspy_gp.gp.schur_iterative.MaskedOperator`: ``precondition``,
    ``factor``, ``factor_inv_t`` and ``logdet_preconditioner``, on ``(P, R, T, m)``
    vectors, and ``whitened_precondition`` and ``whitened_factor``, their whitened
    parts, which the CG per whitened map uses.  Inside, whitened map coordinates with
    ``(P, T', c, c)`` blocks for the ``T'`` whitened maps that get the coarse space (``Z =
    basis ⊗ E_S``, ``S`` those maps); the others keep ``J_k`` alone.

    Parameters
    ----------
    operator
        The :class:`~hyperspy_gp.gp.schur_iterative.MaskedOperator` (``C`` and ``J``).
    factors
        The kernel factors ``(P, n_a, n_a)``.
    coarse_index
        ``(c, n_factors)`` factor-layout coordinates of the coarse points.
    maps
        ``(P, T')`` whitened maps that get the coarse space (:func:`coarse_maps`);
        default all.
    """

    def __init__(self, operator, factors, coarse_index: torch.Tensor, maps: torch.Tensor | None = None) -> None:
        self.op = operator
        n_models, n_tasks = operator.whitened_weights.shape[0], operator.whitened_weights.shape[-1]
        if maps is None:
            maps = torch.arange(n_tasks, device=coarse_index.device).expand(n_models, -1)
        self.maps = maps
        self.n_tasks = n_tasks
        with torch.no_grad():
            columns = math.prod(  # K(x_i, x_c) for missing i and coarse c, (P, m, c)
                f[:, operator.index[:, a]][:, :, coarse_index[:, a]] for a, f in enumerate(factors)
            )
            self.basis, _ = torch.linalg.qr(columns)  # orthonormal: the span is what counts
            e = self._coarse_inverse_covariance()  # Zᵀ diag_k(C_k) Z, (P, T', c, c)
            f = operator.block_gram(self.basis, self.maps)  # Zᵀ diag_k(J_k) Z, (P, T', c, c)
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
            self._logdet_ratio = logdet_ratio.sum(-1)  # over the coarse maps

    @property
    def n_maps(self) -> int:
        """Whitened maps ``T'`` that get the coarse space."""
        return self.maps.shape[-1]

    @property
    def n_values(self) -> int:
        """Columns ``r = c T'`` of the coarse space."""
        return self.basis.shape[-1] * self.n_maps

    def _map_index(self, v: torch.Tensor) -> torch.Tensor:
        """The coarse maps' indices broadcast over ``(P, R, ·, m)`` vectors like ``v``."""
        return self.maps[:, None, :, None].expand(v.shape[0], v.shape[1], self.n_maps, v.shape[-1])

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """``Z y``: ``(P, r, R)`` (rows ordered map by map) → whitened ``(P, R, T, m)``, zero on the other maps."""
        p, _, r = y.shape
        lifted = torch.einsum("pmc,ptcr->prtm", self.basis, y.reshape(p, self.n_maps, -1, r))
        out = lifted.new_zeros(p, r, self.n_tasks, lifted.shape[-1])
        return out.scatter_(2, self._map_index(lifted), lifted)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """``Zᵀ v``: whitened ``(P, R, T, m)`` → ``(P, r, R)``."""
        p, r = v.shape[:2]
        return torch.einsum("pmc,prtm->ptcr", self.basis, v.gather(2, self._map_index(v))).reshape(p, -1, r)

    def _blocks(self, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``Z diag_k(weights_k) Zᵀ v`` for ``(P, T', c, c)`` weights and whitened ``v``."""
        p, r = v.shape[:2]
        y = weights @ self.project(v).reshape(p, self.n_maps, -1, r)
        return self.lift(y.reshape(p, -1, r))

    def _coarse_inverse_covariance(self) -> torch.Tensor:
        """``E_k = Zᵀ C_k Z`` per coarse map, ``(P, T', c, c)``, from the rotated basis.

        With ``V = Qᵀ E_M Z_c`` (the coarse basis rotated into the eigenbasis, ``(P, n, c)``)
        and the whitened weights ``h_{jk}``, ``E_k = Vᵀ diag(h_k) V``: ``T'`` products of
        ``n × c`` matrices (128² × 6, ``c`` = 269, all maps: 0.6 s where ``2 c T``
        structured products took 4.8 s).
        """
        op, basis = self.op, self.basis
        p, _, c = basis.shape
        n = math.prod(op.grid_shape())
        rotated = basis.new_empty(p, n, c)  # (P, n, c), filled a block of columns at a time:
        block = max(1, CHUNK_BYTES // (p * n * basis.element_size()))  # the grid temporaries stay small
        for start in range(0, c, block):
            columns = basis[:, :, start : start + block].transpose(-1, -2).unsqueeze(2)
            rotated[:, :, start : start + block] = kron_dot(
                op.scatter(columns), [q.transpose(-1, -2) for q in op.eigenvectors]).reshape(p, n, -1)
        weights = op.whitened_weights.reshape(p, -1, self.n_tasks)
        weights = weights.gather(2, self.maps[:, None, :].expand(p, weights.shape[1], self.n_maps))
        out = torch.stack([rotated.transpose(1, 2) @ (weights[:, :, k, None] * rotated)
                           for k in range(self.n_maps)], 1)
        return 0.5 * (out + out.transpose(-1, -2))

    def whitened_precondition(self, y: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """``(diag_k(J_k^{-1}) + Z E^{-1} Zᵀ) y`` for whitened ``y``.

        ``E`` holds ``T'`` blocks, zero correction on the maps without a coarse space.
        With ``active`` ``(P, R, T)``, the tiles only on the maps that have an active column.
        """
        return self.op.block_solve(y, active_maps(active)) + self._blocks(self.e_inverse, y)

    def whitened_factor(self, eps: torch.Tensor) -> torch.Tensor:
        """``Φ``'s whitened part: ``Φ ε`` is its ``unwhiten``."""
        le = self.op.block_factor(eps)
        return le - self.op.block_apply(self._blocks(self.factor_weights, le))

    def precondition(self, r: torch.Tensor) -> torch.Tensor:
        """``P^{-1} r = (W^{-T} ⊗ I) (diag_k(J_k^{-1}) + Z E^{-1} Zᵀ) (W^{-1} ⊗ I) r``."""
        return self.op.unwhiten_t(self.whitened_precondition(self.op.whiten(r)))

    def factor(self, eps: torch.Tensor) -> torch.Tensor:
        """``Φ ε`` with ``Φ Φᵀ = P``: probes with covariance ``P``."""
        return self.op.unwhiten(self.whitened_factor(eps))

    def factor_inv_t(self, eps: torch.Tensor) -> torch.Tensor:
        """``Φ^{-T} ε`` (``= P^{-1} Φ ε``)."""
        le = self.op.block_factor(eps)
        return self.op.unwhiten_t(self.op.block_factor_inv_t(eps) + self._blocks(self.factor_inv_t_weights, le))

    def logdet_preconditioner(self) -> torch.Tensor:
        """``log det P`` per model, ``(P,)``."""
        return self.op.logdet_preconditioner() + self._logdet_ratio
