"""Mode products on grid-shaped tensors.

Tensors on the scan grid have the layout ``(P, n_1, ..., n_d, T)``: ``P`` independent
models in a batch, ``d`` spatial axes in numpy order, ``T`` maps (tasks).  A Kronecker
product ``K_1 ⊗ ... ⊗ K_d`` acts on such a tensor one axis at a time, which is how
every large matrix in this engine is avoided.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def mode_dot(x: torch.Tensor, matrix: torch.Tensor, axis: int) -> torch.Tensor:
    """Multiply spatial ``axis`` of ``x`` by a batch of matrices.

    Parameters
    ----------
    x
        Tensor of shape ``(P, n_1, ..., n_d, T)``.
    matrix
        Tensor of shape ``(P, m, n_axis)``.
    axis
        Spatial axis (0-based, not counting the batch dimension).

    Returns
    -------
    torch.Tensor
        ``x`` with axis ``axis`` of length ``m``: ``out[p, .., i, .., t] =
        sum_k matrix[p, i, k] x[p, .., k, .., t]``.
    """
    shape = x.shape
    before, n, after = math.prod(shape[1 : axis + 1]), shape[axis + 1], math.prod(shape[axis + 2 :])
    if before == 1 or after >= matrix.shape[-2]:
        # In place: ``matrix @ x[p, i]`` for each index ``i`` of the axes before, with
        # no transposed copy of ``x`` (one GEMM for the first axis).  torch copies the
        # matrix once per ``i``, which costs less than a copy of ``x`` when the axes
        # after hold at least ``m`` values.  Measured on 2 cores, 256² × 96 values, first
        # axis: 104 → 54 ms.
        out = torch.matmul(matrix.unsqueeze(1), x.reshape(shape[0], before, n, after))
        return out.reshape(*shape[: axis + 1], matrix.shape[-2], *shape[axis + 2 :])
    # Few values after the axis (the last spatial axis, a few maps): move the axis last
    # and make one GEMM of the whole tensor.
    moved = x.movedim(axis + 1, -1)
    out = moved.reshape(shape[0], -1, n) @ matrix.transpose(-1, -2)
    return out.reshape(*moved.shape[:-1], matrix.shape[-2]).movedim(-1, axis + 1)


def kron_dot(x: torch.Tensor, matrices: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Apply ``M_1 ⊗ ... ⊗ M_d`` to ``x`` (skip axes whose matrix is ``None``)."""
    for axis, matrix in enumerate(matrices):
        if matrix is not None:
            x = mode_dot(x, matrix, axis)
    return x


def task_first(blocks: torch.Tensor) -> torch.Tensor:
    """Matrices per grid point ``(P, *grid, S, T)`` in :func:`blocks_dot`'s layout ``(P, S, T, *grid)``, contiguous."""
    return blocks.movedim(-2, 1).movedim(-1, 2).contiguous()


def blocks_dot(blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply a ``T × T`` matrix per grid point to channel-first ``x``.

    Parameters
    ----------
    blocks
        ``(P, S, T, *grid)`` (:func:`task_first`).
    x
        ``(P, R, T, *grid)``.

    Returns
    -------
    torch.Tensor
        ``(P, R, S, *grid)``: ``out[p, r, s, g] = Σ_t blocks[p, s, t, g] x[p, r, t, g]``.

    Notes
    -----
    One fused multiply-add of whole grids per pair ``(s, t)``, where :func:`torch.einsum`
    and :func:`torch.matmul` make a batch of one tiny product per grid point out of
    permuted copies.  Measured on 2 CPU cores, float64, 17 vectors: 128² × 6 maps 3.7
    against 74 ms, 256² × 12 maps 79 against 430 ms.  Under autograd it is that
    :func:`torch.einsum`.
    """
    if torch.is_grad_enabled() and (blocks.requires_grad or x.requires_grad):
        return torch.einsum("pst...,prt...->prs...", blocks, x)
    blocks = blocks.to(x.dtype).unsqueeze(1)  # broadcast over the vectors
    out = x.new_empty(*x.shape[:2], blocks.shape[2], *x.shape[3:])
    for s in range(out.shape[2]):
        row = out[:, :, s]
        torch.mul(x[:, :, 0], blocks[:, :, s, 0], out=row)
        for t in range(1, x.shape[2]):
            row.addcmul_(x[:, :, t], blocks[:, :, s, t])
    return out


def kron_outer(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Outer product of per-axis batched vectors ``(P, n_a)`` → ``(P, n_1, ..., n_d)``.

    This is the diagonal of ``diag(v_1) ⊗ ... ⊗ diag(v_d)`` in grid layout, e.g. the
    eigenvalues of a Kronecker product from those of its factors.
    """
    out = vectors[0]
    for vec in vectors[1:]:
        out = out.unsqueeze(-1) * vec.reshape(vec.shape[0], *([1] * (out.dim() - 1)), -1)
    return out


def kron_rows(matrices: Sequence[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``M_1 ⊗ ... ⊗ M_d`` in grid layout, ``(P, m, n_1, ..., n_d)``.

    ``index`` ``(m, d)`` holds grid coordinates, and ``out[p, i, j_1, ..., j_d] = Π_a
    M_a[p, index[i, a], j_a]``: for the eigenvectors ``Q_a`` of a Kronecker product,
    the pixels ``i`` rotated into its eigenbasis, ``Qᵀ e_i``.
    """
    rows = [matrix[:, index[:, a], :] for a, matrix in enumerate(matrices)]  # (P, m, n_a)
    out = rows[0]
    for row in rows[1:]:
        out = out.unsqueeze(-1) * row.reshape(*row.shape[:2], *([1] * (out.dim() - 2)), row.shape[-1])
    return out


def sum_except_axis(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Sum a grid tensor ``(P, n_1, ..., n_d)`` over every spatial axis but ``axis``."""
    dims = [d for d in range(1, x.dim()) if d != axis + 1]
    return x.sum(dim=dims) if dims else x
