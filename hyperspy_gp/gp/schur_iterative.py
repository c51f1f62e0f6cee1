r"""Exact inference with many scattered missing pixels: the Schur complement by CG.

:mod:`~hyperspy_gp.gp.schur` factorises ``C = (Σ^{-1})_{MM}`` over the missing values
``M``, one structured solve per missing value: right for a few missing pixels, too
slow and too large for a sparse scan (a random subset of the pixels) or many dead
pixels.  Here ``C`` is never formed.  A product ``C v`` scatters ``v`` onto the grid,
applies ``Σ^{-1}`` exactly in the Kronecker eigenbasis and gathers the missing values
back: ``O(n Σ_a n_a T)``.  The same identities as in :mod:`~hyperspy_gp.gp.schur`
then need three things:

- ``z* = -C^{-1} (Σ^{-1} ȳ(0))_M``, the conditional mean of the missing values, by
  preconditioned conjugate gradients (CG) to a relative residual of 1e-10 for the
  posterior mean: exact.  Inside the likelihood, solved with the log-determinant
  probes, to 1e-7 (``ESTIMATE_CG_TOLERANCE``), which leaves the likelihood and its
  gradient far more accurate than the probes' estimate.
- ``log det C``, by stochastic Lanczos quadrature (as in
  :mod:`~hyperspy_gp.gp.iterative`) with the block-Jacobi preconditioner ``J`` (the
  exact blocks of ``C`` between the missing values of each tile of neighbouring pixels,
  ``Σ_j q_j(i) q_j(i') M_j``, built per whitened map by structured products: at most 25
  pixels per tile, up to 100 where the mask has connected masked regions, see
  :class:`MaskedOperator`): ``log det C = log det J +
  log det(J^{-1/2} C J^{-1/2})``, the last term estimated from fixed probes ``z_i =
  chol(J) ε_i``.  For scattered missing pixels
  ``C`` is close to block-diagonal, so CG needs tens of iterations and the estimate is
  accurate.  Deep inside large masked regions ``C`` also has smooth modes that ``J``
  does not see; there ``J`` gets the coarse-space correction of
  :mod:`~hyperspy_gp.gp.coarse_space` (``P^{-1} = J^{-1} + Z E^{-1} Zᵀ``, with ``log det
  P`` and a factor ``Φ`` in place of ``chol(J)``, all exact).  CG runs in whitened map
  coordinates, where ``C``, ``J`` and the coarse space are block-diagonal over the maps
  (:class:`MaskedOperator`): one system per map and probe, each with its own Lanczos
  quadrature, so the well-determined maps take the iterations they need while the
  others stop after a few and cost nothing more (:meth:`MaskedOperator.whitened_cg`).
  The largest regions with long length scales and very low noise still leave ``C`` too
  ill-conditioned: CG then stops with a message.
- its gradient ``∂(-½ log det C) = ½ tr(C^{-1} (Σ^{-1} ∂Σ Σ^{-1})_{MM})``, estimated by
  ``½ (1/m) Σ_i u_iᵀ ∂Σ w_i`` with ``u_i = Σ^{-1} E_M C^{-1} z_i`` and ``w_i = Σ^{-1} E_M
  J^{-1} z_i`` (``P^{-1} z_i`` with the coarse space): bilinear forms in ``Σ``,
  differentiated with the vectors held fixed.

Prediction after such a fit: :mod:`~hyperspy_gp.gp.schur_iterative_prediction`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from hyperspy_gp.gp.cholesky import safe_cholesky
from hyperspy_gp.gp.coarse_space import CoarseCorrection, CoarseLattice, coarse_maps
from hyperspy_gp.gp.iterative import (
    CG_TOLERANCE,
    ESTIMATE_CG_TOLERANCE,
    MAX_CG_ITERATIONS,
    CGConvergenceError,
    CGResult,
    active_maps,
    lanczos_logdet_quadrature,
    preconditioned_cg,
)
from hyperspy_gp.gp.likelihood import (
    GridICMSolve,
    grid_icm_log_likelihood,
    solve_grid_icm,
)
from hyperspy_gp.gp.tensor import kron_dot
from hyperspy_gp.memory import CHUNK_BYTES, JACOBI_TILE_PIXELS, REGION_TILE_PIXELS

#: Largest pair-product matrix (``n_a² × tile`` elements) per factor axis when building
#: the tile blocks: a non-separable kernel's single factor over all pixels keeps tiles
#: of one pixel.
MAX_PAIR_ELEMENTS = 2**23
#: Largest cost (multiply-adds per vector) of applying the block-Jacobi preconditioner,
#: relative to a product with ``C``, up to which tiles grow for connected masked regions.
MAX_JACOBI_COST = 0.25


def jacobi_tile(factor_shape: Sequence[int], regions: torch.Tensor | None = None) -> int:
    """Side of the tiles whose missing pixels form one block of the preconditioner (per whitened map).

    The largest side with at most :data:`~hyperspy_gp.memory.JACOBI_TILE_PIXELS` pixels
    per tile.  A tile of neighbouring pixels holds the strongest couplings of ``C``.  The
    blocks are built per whitened map (see :class:`MaskedOperator`), so a tile's side
    does not depend on the number of maps.  Measured, one likelihood evaluation at
    hyperparameters fitted to the complete maps, 128² × 6 maps, tiles of 3, 5 and 8
    pixels a side forced: 5 % missing at random 0.91, 0.91 and 1.30 s; 20 %, 1.78 s
    with 5 and 2.46 s with 8 (21 and 22 CG iterations); 50 %, 4.6 and 4.8 s (56 and 42
    iterations; that mask has coarse points and takes 10 × 10 tiles by the rule below,
    5.4 s and 44 iterations).

    With ``regions`` (the missing pixels of a mask with connected masked regions, which
    the coarse space serves), tiles grow further, up to
    :data:`~hyperspy_gp.memory.REGION_TILE_PIXELS` pixels, while applying ``J`` costs at
    most :data:`MAX_JACOBI_COST` of a product with ``C``.  Measured on a masked quarter
    disc of 128² × 6 maps: 10 × 10 tiles 10.3 s and 110 CG iterations, 14 × 14 tiles
    13.7 s and 116.

    Parameters
    ----------
    factor_shape
        Lengths of the kernel's factor axes (the grid for a separable kernel, the
        number of pixels for a non-separable one).
    regions
        ``(m, n_factors)`` factor-layout coordinates of the missing pixels when the mask
        has connected masked regions, ``None`` otherwise.

    Returns
    -------
    int
        Tile side in pixels along every factor axis (1: per-pixel blocks).

    Examples
    --------
    >>> jacobi_tile((64, 64)), jacobi_tile((300,)), jacobi_tile((4096,))
    (5, 25, 1)
    >>> yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    >>> disc = torch.nonzero(yy**2 + xx**2 < 77**2)  # a masked quarter disc
    >>> jacobi_tile((128, 128), regions=disc)
    10
    """
    tile = 1
    while _tile_fits(tile + 1, factor_shape, JACOBI_TILE_PIXELS):
        tile += 1
    if regions is None:
        return tile
    product = 2 * math.prod(factor_shape) * sum(factor_shape)  # multiply-adds of C v per column and map
    while _tile_fits(tile + 1, factor_shape, REGION_TILE_PIXELS):
        if used_tiles(regions, tile + 1) * (tile + 1) ** (2 * len(factor_shape)) > MAX_JACOBI_COST * product:
            break
        tile += 1
    return tile


def _tile_fits(side: int, factor_shape: Sequence[int], max_pixels: int) -> bool:
    """Whether tiles of ``side`` keep within ``max_pixels`` pixels and the pair-product limit."""
    return (side ** len(factor_shape) <= max_pixels and side <= max(factor_shape)
            and all(n * n * side <= MAX_PAIR_ELEMENTS for n in factor_shape))


def used_tiles(index: torch.Tensor, tile: int) -> int:
    """Tiles of side ``tile`` that hold at least one of the pixels ``index`` ``(m, n_factors)``."""
    return len(torch.unique(torch.div(index, tile, rounding_mode="floor"), dim=0))


def jacobi_block_values(observed, factor_shape: Sequence[int], n_tasks: int, regions: bool) -> int:
    """Values ``T U k²`` of the block-Jacobi preconditioner's tile blocks (one model) for a mask.

    ``U`` tiles hold a missing pixel, ``k`` pixels each (:func:`jacobi_tile` for one
    whitened map; ``regions`` as for :class:`MaskedOperator`), one block per whitened
    map.  For :func:`~hyperspy_gp.memory.estimate_memory`.

    Examples
    --------
    >>> observed = np.ones((64, 64), dtype=bool)
    >>> observed[:4, :4] = False  # one 5 × 5 tile of 25 pixels, for each of the 6 whitened maps
    >>> jacobi_block_values(observed, (64, 64), 6, regions=False) == 6 * 25**2
    True
    """
    from hyperspy_gp.gp.dense import observed_index_from_mask

    index = observed_index_from_mask(~np.asarray(observed, dtype=bool), tuple(factor_shape))
    tile = jacobi_tile(factor_shape, index if regions else None)
    return n_tasks * used_tiles(index, tile) * tile ** (2 * len(factor_shape))


def tile_slots(index: torch.Tensor, tile: int, grid_shape: Sequence[int]):
    """Tiles of side ``tile`` that hold a pixel of ``index`` ``(m, n_factors)``, and where each pixel sits.

    Returns ``tiles`` (the used tiles' C-order numbers, sorted), ``slot`` (each pixel's
    tile, an index into ``tiles``) and ``position`` (its C-order place within the tile).
    """
    counts = [math.ceil(n / tile) for n in grid_shape]
    tile_id = torch.zeros_like(index[:, 0])
    position = torch.zeros_like(index[:, 0])
    for axis, count in enumerate(counts):
        tile_id = tile_id * count + index[:, axis] // tile
        position = position * tile + index[:, axis] % tile
    tiles, slot = torch.unique(tile_id, return_inverse=True)
    return tiles, slot, position


def tile_pair_sums(eigenvectors: Sequence[torch.Tensor], weights: torch.Tensor, tile: int,
                   tiles: torch.Tensor) -> torch.Tensor:
    """``Σ_j q_j(i) q_j(i') w_j`` for all pixel pairs ``i, i'`` of each used tile, ``(P, U, k, k, c)``.

    ``weights`` ``(P, *grid, c)`` holds ``c`` channels per eigenvalue (the ``T`` whitened
    maps' ``h_{jk}``); ``k = tile^d`` pixels per tile in C order.
    Per factor axis, the products ``Q_a[i, j] Q_a[i', j]`` of the rows ``i, i'`` of a tile
    (zero rows pad the last tile) turn the sum into one :func:`kron_dot`, computed over
    chunks of the first axis' tiles so that its output stays within
    :data:`~hyperspy_gp.memory.CHUNK_BYTES`.
    """
    p, *fg, c = weights.shape
    d = len(fg)
    counts = [math.ceil(n / tile) for n in fg]
    pairs = []
    for q, n, count in zip(eigenvectors, fg, counts):
        padded = q.new_zeros(p, count * tile, n)
        padded[:, :n] = q
        padded = padded.reshape(p, count, tile, n)
        pairs.append((padded[:, :, :, None] * padded[:, :, None, :]).reshape(p, count, tile * tile, n))
    per_tile_row = p * tile**2 * math.prod(n * tile**2 for n in counts[1:]) * c * weights.element_size()
    rows = max(1, CHUNK_BYTES // per_tile_row)
    tiles_per_row = math.prod(counts[1:])
    first = tiles // tiles_per_row
    k = tile**d
    out = weights.new_empty(p, len(tiles), k, k, c)
    for start in range(0, counts[0], rows):
        chosen = (first >= start) & (first < start + rows)
        if not bool(chosen.any()):
            continue
        mats = [pairs[0][:, start : start + rows].reshape(p, -1, fg[0])]
        mats += [pair.reshape(p, -1, n) for pair, n in zip(pairs[1:], fg[1:])]
        block = kron_dot(weights, mats)  # (P, c_0·tile², ..., c_{d-1}·tile², c)
        block = block.reshape(p, *[x for n in block.shape[1 : 1 + d] for x in (n // tile**2, tile, tile)], c)
        # (P, tiles.., i.., i'.., c) → (P, tiles of the chunk, k, k, c)
        order = [0, *range(1, 3 * d, 3), *range(2, 3 * d, 3), *range(3, 3 * d + 1, 3), 3 * d + 1]
        block = block.permute(order).reshape(p, -1, k, k, c)
        out[:, chosen] = block[:, tiles[chosen] - start * tiles_per_row]
    return out


def masked_tiles(blocks: torch.Tensor, slot: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Tile blocks ``(..., U, k, k)`` kept at the tiles' missing pixels, identity at their observed ones.

    ``slot`` and ``position`` as from :func:`tile_slots`.
    """
    present = blocks.new_zeros(blocks.shape[-3], blocks.shape[-1])
    present[slot, position] = 1.0
    blocks = blocks * (present[:, :, None] * present[:, None, :]) + torch.diag_embed(1.0 - present)
    return 0.5 * (blocks + blocks.transpose(-1, -2))


class MaskedOperator:
    """``C = (Σ^{-1})_{MM}`` and its block-Jacobi preconditioner, on ``(P, R, T, m)`` vectors.

    The preconditioner ``J`` holds the exact blocks of ``C`` between the missing values
    of each tile of neighbouring pixels (:func:`jacobi_tile`); across tiles it is zero.
    It is built and applied in whitened task coordinates: with ``D^{-1/2} B D^{-1/2} = R
    Γ Rᵀ`` (``D`` the noise, with the blocks' jitter) and ``W = D^{-1/2} R``, every block
    is ``M_j = (λ_j B + D)^{-1} = W diag_k(h_{jk}) Wᵀ`` with ``h_{jk} = 1 / (λ_j γ_k +
    1)``.  All maps miss the same pixels, so ``C = (W ⊗ I) diag_k(C_k) (W ⊗ I)ᵀ`` with
    ``C_k = (Q diag(h_k) Qᵀ)_{MM}``: ``T`` independent single-map Schur complements.  The
    tile blocks of ``C`` are those of the ``C_k`` transformed by ``W``, so ``J = (W ⊗ I)
    diag_k(J_k) (W ⊗ I)ᵀ`` holds the same blocks with ``T`` factorisations of ``k × k``
    (``k`` pixels per tile) instead of one of ``kT × kT``: ``T`` times less memory and
    ``T²`` times less work for the same tile, so tiles need not shrink as maps are
    added.  Nothing here is differentiated, so repeated eigenvalues of ``B`` (identical
    maps, rank-deficient ``B``) are harmless.

    Parameters
    ----------
    solve
        The full-grid eigenbasis and ``T × T`` blocks (:func:`solve_grid_icm`).
    index
        ``(m, n_factors)`` coordinates of the missing pixels in factor layout.
    tile
        Tile side; default :func:`jacobi_tile` (1 gives per-pixel blocks).
    regions
        Whether the mask has connected masked regions (coarse points), which lets the
        default tiles grow (see :func:`jacobi_tile`).
    """

    def __init__(self, solve: GridICMSolve, index: torch.Tensor, tile: int | None = None,
                 regions: bool = False) -> None:
        self.solve, self.index = solve, index
        self.eigenvectors = solve.eigenvectors
        self.inverse_blocks = solve.block_inverse()  # M_j, (P, *fg, T, T)
        p, *fg, t, _ = self.inverse_blocks.shape
        self.tile = jacobi_tile(fg, index if regions else None) if tile is None else int(tile)
        with torch.no_grad():
            self.root, gamma, self.rotation = solve.whitening
            # h_jk, the whitened maps' weights: C_k = (Q diag(h_k) Qᵀ)_MM, (P, *fg, T)
            self.whitened_weights = 1.0 / (solve.eigenvalues_grid[..., None] * gamma.reshape(p, *[1] * len(fg), t) + 1)
            self.tiles, self.slot, self.position = tile_slots(index, self.tile, fg)
            sums = tile_pair_sums(self.eigenvectors, self.whitened_weights, self.tile, self.tiles)  # (P, U, k, k, T)
            blocks = masked_tiles(sums.permute(0, 4, 1, 2, 3), self.slot, self.position)
            self.jacobi_cholesky, _ = safe_cholesky(blocks)  # chol(J_k) per tile, (P, T, U, k, k)

    def _to_tiles(self, v: torch.Tensor) -> torch.Tensor:
        """``(P, R, T, m)`` → ``(P, T, U, k, R)``: each used tile's values, zeros at its observed pixels."""
        p, r, t, _ = v.shape
        x = v.new_zeros(p, r, t, len(self.tiles), self.jacobi_cholesky.shape[-1])
        x[:, :, :, self.slot, self.position] = v
        return x.permute(0, 2, 3, 4, 1)

    def _from_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """``(P, T, U, k, R)`` → ``(P, R, T, m)``."""
        return x[:, :, self.slot, self.position].permute(0, 3, 1, 2)

    def _maps(self, v: torch.Tensor, scale: torch.Tensor | None, transpose: bool) -> torch.Tensor:
        """``diag(scale) R v`` (``transpose=False``) or ``Rᵀ diag(scale) v`` over the maps of ``(P, R, T, m)``."""
        scale = 1.0 if scale is None else scale[:, None, :, None]
        if transpose:
            return torch.einsum("pts,prtm->prsm", self.rotation, scale * v)
        return scale * torch.einsum("pts,prsm->prtm", self.rotation, v)

    def rotate_probes(self, eps: torch.Tensor) -> torch.Tensor:
        """``(Rᵀ ⊗ I) ε``: white probes in whitened map coordinates, ``(P, R, T, m)``.

        The probes' factor is then ``Φ (Rᵀ ⊗ I)`` (:meth:`factor`), which does not depend
        on the signs ``eigh`` gives the columns of ``R`` (nor on the basis of repeated
        eigenvalues): with ``Φ ε`` alone a sign flip between nearby hyperparameters
        redrew the cross-map terms of the gradient estimate.
        """
        return self._maps(eps, None, transpose=True)

    def whiten(self, v: torch.Tensor) -> torch.Tensor:
        """``(W^{-1} ⊗ I) v``, ``W^{-1} = Rᵀ D^{1/2}``: into whitened map coordinates."""
        return self._maps(v, self.root, transpose=True)

    def unwhiten_t(self, y: torch.Tensor) -> torch.Tensor:
        """``(W^{-T} ⊗ I) y = D^{1/2} R y``."""
        return self._maps(y, self.root, transpose=False)

    def unwhiten(self, y: torch.Tensor) -> torch.Tensor:
        """``(W ⊗ I) y = D^{-1/2} R y``."""
        return self._maps(y, 1.0 / self.root, transpose=False)

    def block_solve(self, y: torch.Tensor, maps: torch.Tensor | None = None) -> torch.Tensor:
        """``diag_k(J_k^{-1}) y`` for whitened ``y`` ``(P, R, T, m)``; with ``maps``, on those alone (zeros else)."""
        if maps is None:
            return self._from_tiles(torch.cholesky_solve(self._to_tiles(y), self.jacobi_cholesky))
        out = torch.zeros_like(y)
        out[:, :, maps] = self._from_tiles(torch.cholesky_solve(self._to_tiles(y[:, :, maps]),
                                                                self.jacobi_cholesky[:, maps]))
        return out

    def block_apply(self, y: torch.Tensor) -> torch.Tensor:
        """``diag_k(J_k) y`` for whitened ``y``."""
        x = self._to_tiles(y)
        return self._from_tiles(self.jacobi_cholesky @ (self.jacobi_cholesky.transpose(-1, -2) @ x))

    def block_gram(self, columns: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """``Xᵀ J_k X`` ``(P, T', c, c)`` for the whitened maps ``k`` in ``maps`` and columns ``X`` ``(P, m, c)``.

        Tile by tile, ``Σ_u (L_{ku}ᵀ X_u)ᵀ (L_{ku}ᵀ X_u)``: products of about ``m × c`` by
        ``c`` per map, no product of ``J`` with unit columns; tiles in chunks of
        :data:`~hyperspy_gp.memory.CHUNK_BYTES`.
        """
        p, _, c = columns.shape
        n_tiles, k, t = self.jacobi_cholesky.shape[2], self.jacobi_cholesky.shape[-1], maps.shape[-1]
        per_tile = p * k * (c * (1 + 2 * t) + t * k)  # X_u; L_ku and L_kuᵀ X_u (and its copy) per map
        per_chunk = max(1, CHUNK_BYTES // (per_tile * columns.element_size()))
        models = torch.arange(p, device=maps.device)[:, None]
        out = columns.new_zeros(p, maps.shape[-1], c, c)
        for start in range(0, n_tiles, per_chunk):
            stop = min(start + per_chunk, n_tiles)
            inside = (self.slot >= start) & (self.slot < stop)
            tiles = columns.new_zeros(p, stop - start, k, c)  # X_u, zeros at each tile's observed pixels
            tiles[:, self.slot[inside] - start, self.position[inside]] = columns[:, inside]
            chol = self.jacobi_cholesky[models, maps, start:stop]  # (P, T', u, k, k)
            y = (chol.transpose(-1, -2) @ tiles[:, None]).flatten(2, 3)  # (P, T', u k, c)
            out += y.transpose(-1, -2) @ y
        return out

    def block_factor(self, eps: torch.Tensor) -> torch.Tensor:
        """``diag_k(chol(J_k)) ε``."""
        return self._from_tiles(self.jacobi_cholesky @ self._to_tiles(eps))

    def block_factor_inv_t(self, eps: torch.Tensor) -> torch.Tensor:
        """``diag_k(chol(J_k)^{-T}) ε``."""
        upper = self.jacobi_cholesky.transpose(-1, -2)
        return self._from_tiles(torch.linalg.solve_triangular(upper, self._to_tiles(eps), upper=True))

    def grid_shape(self) -> tuple[int, ...]:
        return tuple(self.inverse_blocks.shape[1:-2])

    def scatter(self, v: torch.Tensor) -> torch.Tensor:
        """``E_M v``: ``(P, R, T, m)`` → grid ``(P, *fg, T, R)`` (zeros at the observed pixels)."""
        p, r, t, _ = v.shape
        out = v.new_zeros(p, *self.grid_shape(), t, r)
        out[(slice(None), *self.index.T)] = v.permute(0, 3, 2, 1)
        return out

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``E_Mᵀ x``: grid ``(P, *fg, T, R)`` → ``(P, R, T, m)``."""
        return x[(slice(None), *self.index.T)].permute(0, 3, 2, 1)

    def inverse_covariance(self, x: torch.Tensor) -> torch.Tensor:
        """``Σ^{-1} x`` for grid ``x`` ``(P, *fg, T, R)``, exactly in the eigenbasis."""
        rotated = kron_dot(x, [q.transpose(-1, -2) for q in self.eigenvectors])
        return kron_dot(self.inverse_blocks @ rotated, self.eigenvectors)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.gather(self.inverse_covariance(self.scatter(v)))

    def whitened_apply(self, y: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """``diag_k(C_k) y`` for whitened ``y`` ``(P, R, T, m)``, on the ``active`` ``(P, R, T)`` columns alone.

        ``C_k y_k = (Q diag(h_k) Qᵀ E_M y_k)_M``: each column is one map's system, with no
        ``T × T`` mixing, so a converged column costs nothing (zeros are returned there).
        """
        out = torch.zeros_like(y)
        active = torch.ones(y.shape[:3], dtype=torch.bool, device=y.device) if active is None else active
        weights = self.whitened_weights.movedim(-1, 1)  # h_k, (P, T, *fg)
        for p in range(y.shape[0]):  # the models have their own eigenbases
            rows, maps = torch.nonzero(active[p], as_tuple=True)
            if rows.numel() == 0:
                continue
            grid = y.new_zeros(1, *self.grid_shape(), rows.numel())
            grid[(0, *self.index.T)] = y[p, rows, maps].T  # E_M y, one column per (r, k)
            eigenvectors = [q[p : p + 1] for q in self.eigenvectors]
            rotated = kron_dot(grid, [q.transpose(-1, -2) for q in eigenvectors])
            rotated = rotated * weights[p, maps].movedim(0, -1)
            out[p, rows, maps] = kron_dot(rotated, eigenvectors)[(0, *self.index.T)].T
        return out

    def whitened_precondition(self, y: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """``diag_k(J_k^{-1}) y`` for whitened ``y``: ``J``'s inverse in whitened coordinates.

        With ``active`` ``(P, R, T)``, only on the maps that have an active column.
        """
        return self.block_solve(y, active_maps(active))

    def whitened_factor(self, eps: torch.Tensor) -> torch.Tensor:
        """``diag_k(chol(J_k)) ε``: ``Φ`` in whitened coordinates (``Φ ε`` is its :meth:`unwhiten`)."""
        return self.block_factor(eps)

    def precondition(self, r: torch.Tensor) -> torch.Tensor:
        """``J^{-1} r = (W^{-T} ⊗ I) diag_k(J_k^{-1}) (W^{-1} ⊗ I) r``."""
        return self.unwhiten_t(self.whitened_precondition(self.whiten(r)))

    def factor(self, eps: torch.Tensor) -> torch.Tensor:
        """``Φ ε`` with ``Φ = (W ⊗ I) diag_k(chol(J_k))``, ``Φ Φᵀ = J``: probes with covariance ``J``."""
        return self.unwhiten(self.whitened_factor(eps))

    def factor_inv_t(self, eps: torch.Tensor) -> torch.Tensor:
        """``Φ^{-T} ε`` (``= J^{-1} Φ ε``)."""
        return self.unwhiten_t(self.block_factor_inv_t(eps))

    def logdet_preconditioner(self) -> torch.Tensor:
        """``log det J = Σ_k log det J_k - m Σ_t log d_t`` per model, ``(P,)``."""
        diag = torch.diagonal(self.jacobi_cholesky, dim1=-2, dim2=-1)
        scale = 2.0 * self.index.shape[0] * torch.log(self.root).sum(-1)
        return 2.0 * torch.log(diag).reshape(diag.shape[0], -1).sum(-1) - scale

    def whitened_cg(self, rhs: torch.Tensor, preconditioner=None, tolerances: dict | None = None) -> CGResult:
        """``diag_k(C_k)^{-1} rhs`` for whitened ``rhs`` ``(P, R, T, m)``: one CG per map and column.

        ``C^{-1} b`` is the :meth:`unwhiten_t` of this solve for ``whiten(b)``.  In whitened
        coordinates ``C`` and the preconditioner (``J`` by default, or its coarse-space
        correction) are block-diagonal over the maps, so each map's systems converge on
        their own: maps with a low signal-to-noise ratio stop after a few iterations, and
        their columns cost nothing after (:meth:`whitened_apply`), where one CG over all
        maps applied ``C`` to every map until the slowest converged.  ``tolerances`` maps
        dtypes to the relative residual (``CG_TOLERANCE`` by default); a failure says what
        to do about large masked regions.
        """
        precondition = (preconditioner or self).whitened_precondition
        tol = (tolerances or CG_TOLERANCE).get(rhs.dtype, 1e-5)
        try:
            return preconditioned_cg(self.whitened_apply, precondition, rhs, tol, MAX_CG_ITERATIONS,
                                     column_dims=3, skip_converged=True)
        except CGConvergenceError as exc:
            raise CGConvergenceError(
                f"{exc} The iterative Schur complement suits scattered missing pixels (sparse scans, dead "
                "pixels) and masked regions of moderate extent; large connected masked regions with long "
                "length scales make it ill-conditioned. Crop such regions away with s.inav[...], or decompose "
                "without a navigation_mask there."
            ) from None


class SchurCGSolve:
    """Completed targets ``ȳ(z*)`` and, with ``probes``, the ``log det C`` estimate and the gradient vectors.

    Without ``probes`` (prediction) only ``z*`` is solved for.  With ``coarse`` (the
    coarse points deep inside masked regions, :class:`~hyperspy_gp.gp.coarse_space.CoarseLattice`)
    the block-Jacobi preconditioner gets larger tiles (:func:`jacobi_tile`) and, on the
    whitened maps that need it (:func:`~hyperspy_gp.gp.coarse_space.coarse_maps`), the
    coarse-space correction of :class:`~hyperspy_gp.gp.coarse_space.CoarseCorrection`.
    No autograd.
    """

    def __init__(self, targets, task_covariance, noise, factors, index: torch.Tensor,
                 probes: torch.Tensor | None = None, coarse: CoarseLattice | None = None) -> None:
        with torch.no_grad():
            zeroed = targets.clone()
            zeroed[(slice(None), *index.T)] = 0.0
            solve = solve_grid_icm(zeroed, task_covariance, noise, factors)
            self.operator = op = MaskedOperator(solve, index, regions=coarse is not None)
            self.preconditioner = op
            maps = coarse_maps(op) if coarse is not None else None
            points = coarse.points(maps.shape[-1]) if maps is not None and maps.shape[-1] else None
            if points is not None:
                self.preconditioner = CoarseCorrection(op, [f.detach() for f in factors], points, maps)
            pre = self.preconditioner
            alpha0 = kron_dot(solve.rotated_weights, solve.eigenvectors)  # Σ⁻¹ ȳ(0), (P, *fg, T)
            u = op.whiten(op.gather(alpha0.unsqueeze(-1)))  # (P, 1, T, m), whitened
            # Whitened coordinates: one CG per map (MaskedOperator.whitened_cg); the probes
            # z = Φ (Rᵀ ⊗ I) ε are Φ's whitened part, W⁻¹ z, of the rotated probes.
            if probes is None:  # the posterior mean: to CG_TOLERANCE
                cg = op.whitened_cg(u, pre)
            else:
                probes = op.rotate_probes(probes)
                cg = op.whitened_cg(torch.cat([u, pre.whitened_factor(probes)], dim=1), pre, ESTIMATE_CG_TOLERANCE)
            cg.solution = op.unwhiten_t(cg.solution)  # C⁻¹ b = (W^{-T} ⊗ I) diag_k(C_k)⁻¹ (W⁻¹ ⊗ I) b
            self.completed = zeroed
            self.completed[(slice(None), *index.T)] = -cg.solution[:, 0].transpose(-1, -2)
            self.n_missing_values = index.shape[0] * targets.shape[-1]
            self.jitter = solve.jitter
            if probes is not None:
                self._estimate_logdet(cg, probes)

    def _estimate_logdet(self, cg: CGResult, probes: torch.Tensor) -> None:
        """``log det C`` by SLQ from the probe columns of ``cg``, and the gradient vectors."""
        op, pre = self.operator, self.preconditioner
        with torch.no_grad():
            n_probes = probes.shape[1]
            probe_cg = CGResult(cg.solution[:, 1:], cg.alphas[:, :, 1:], cg.betas[:, :, 1:], cg.iterations[:, 1:])
            norms = probes.pow(2).sum(dim=3)  # per probe and map: one Lanczos quadrature per map
            self.logdet_c = pre.logdet_preconditioner() + lanczos_logdet_quadrature(probe_cg, norms) / n_probes
            self.left = op.inverse_covariance(op.scatter(probe_cg.solution))  # Σ⁻¹ E_M C⁻¹ z_i
            self.right = op.inverse_covariance(op.scatter(pre.factor_inv_t(probes)))  # Σ⁻¹ E_M P⁻¹ z_i


def _apply_covariance(h: torch.Tensor, task_covariance, noise, factors) -> torch.Tensor:
    """``Σ h`` for columns ``h`` ``(P, *fg, T, K)``; differentiable in ``B``, ``σ²``, ``K_a``."""
    p, *fg, t, k = h.shape
    kh = kron_dot(h.reshape(p, *fg, t * k), factors).reshape(p, *fg, t, k)
    b = task_covariance.reshape(p, *([1] * len(fg)), t, t)
    return b @ kh + noise.reshape(p, *([1] * len(fg)), t, 1) * h


def schur_cg_log_likelihood(targets, task_covariance, noise, factors, index: torch.Tensor,
                            probes: torch.Tensor, coarse: CoarseLattice | None = None) -> torch.Tensor:
    """``log p(y_O)`` per model, ``(P,)``, with ``log det C`` estimated (see the module docstring).

    Parameters
    ----------
    targets, task_covariance, noise, factors, index
        As for :func:`~hyperspy_gp.gp.schur.schur_log_likelihood`.
    probes
        ``(P, R, T, m)`` whitened probes over the missing values, e.g. Rademacher signs
        (:func:`~hyperspy_gp.gp.iterative.rademacher_probes` with the grid ``(m,)``).
    coarse
        The coarse points of the preconditioner's coarse space (see
        :class:`SchurCGSolve`), ``None`` for block-Jacobi alone.

    Returns
    -------
    torch.Tensor
        Differentiable in every argument but ``targets`` and ``probes``.
    """
    schur = SchurCGSolve(targets, task_covariance, noise, factors, index, probes, coarse)
    full = grid_icm_log_likelihood(schur.completed, task_covariance, noise, factors)
    forms = (schur.left * _apply_covariance(schur.right, task_covariance, noise, factors)).sum(
        dim=tuple(range(1, schur.left.dim()))) / probes.shape[1]
    correction = -0.5 * schur.logdet_c + 0.5 * schur.n_missing_values * math.log(2.0 * math.pi)
    return full + correction + 0.5 * (forms - forms.detach())
