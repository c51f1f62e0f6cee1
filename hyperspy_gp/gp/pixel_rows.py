r"""The rows of a Kronecker eigenbasis at a few pixels, multiplied without forming them.

For the eigenvectors ``Q = Q_a ⊗ Q_b`` of a separable kernel on a grid (``Q_a`` on the
first axis, ``Q_b`` the Kronecker product of the others) and ``m`` pixels ``i = (a_i,
b_i)``, the pixels' rows ``V[j, i] = q_j(i) = Q_a[a_i, j_a] Q_b[b_i, j_b]`` make an
``n × m`` matrix.  Formed, it costs ``n m`` values, ``n m`` per product and ``n m²`` per
Gram matrix ``Vᵀ diag(w) V``.  Grouped by the ``r ≤ n_a`` *lines* (first-axis
coordinates) that hold a pixel, with at most ``s`` pixels on one line:

=============================  ==========================  ===============
operation                      here                        ``V`` formed
=============================  ==========================  ===============
``Vᵀ diag(w) V``               ``r² n + m r s n_b``        ``n m²``
``diag(V X Vᵀ)``               ``r² n + m r s n_b``        ``n m²``
``V x`` and ``Vᵀ u``           ``r n + r s n_b``           ``n m``
=============================  ==========================  ===============

(``n = n_a n_b``; for ``m`` scattered pixels on a square grid ``r ≈ min(m, n_a)`` and
``s ≪ m``.)  The missing pixels' preconditioner of the iterative path
(:class:`~hyperspy_gp.gp.iterative_missing.SchurPreconditioner`) is built from these
four products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hyperspy_gp import memory
from hyperspy_gp.gp.tensor import kron_rows


@dataclass
class PixelRows:
    """Rows ``V`` of ``Q = Q_a ⊗ Q_b`` at ``m`` pixels, kept by line.

    Pixels are in the order given to :meth:`build`; vectors on the pixels are ``(..., m)``,
    vectors in the eigenbasis ``(..., n_a, n_b)``, each with a leading model axis ``P``.
    """

    first: torch.Tensor  # Q_a at the lines holding a pixel, (P, r, n_a)
    rest: torch.Tensor  # Q_b at each pixel's other coordinates, (P, m, n_b)
    padded: torch.Tensor  # ``rest`` grouped by line, zero-padded, (P, r, s, n_b)
    line: torch.Tensor  # each pixel's line, 0 … r − 1, (m,)
    slot: torch.Tensor  # its place among its line's pixels, 0 … s − 1, (m,)

    @classmethod
    def build(cls, eigenvectors: list[torch.Tensor], pixels: torch.Tensor) -> PixelRows:
        """Rows of ``Q_1 ⊗ … ⊗ Q_d`` (``eigenvectors``, ``(P, n_a, n_a)`` each) at ``pixels`` ``(m, d)``."""
        first, *others = eigenvectors
        lines, line = torch.unique(pixels[:, 0], return_inverse=True)
        counts = torch.bincount(line, minlength=lines.numel())
        order = torch.argsort(line, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(line)
        slot[order] = torch.arange(line.numel(), device=line.device) - starts[line[order]]
        if others:
            rest = kron_rows(others, pixels[:, 1:]).flatten(2)  # (P, m, n_b)
        else:  # a 1-D grid: Q_b is the 1 × 1 identity
            rest = first.new_ones(first.shape[0], line.numel(), 1)
        most = int(counts.max()) if lines.numel() else 0  # no pixels: empty products
        padded = rest.new_zeros(rest.shape[0], lines.numel(), most, rest.shape[-1])
        padded[:, line, slot] = rest
        return cls(first[:, lines, :], rest, padded, line, slot)

    @property
    def n_pixels(self) -> int:
        return self.line.numel()

    def _chunks(self) -> list[slice]:
        """Slices of pixels whose temporaries fit :data:`~hyperspy_gp.memory.PIXEL_ROWS_CHUNK_VALUES`."""
        size = max(1, memory.PIXEL_ROWS_CHUNK_VALUES // max(1, self.first.shape[1] * self.rest.shape[-1]))
        return [slice(start, start + size) for start in range(0, self.n_pixels, size)]

    def _line_pairs(self) -> torch.Tensor:
        """``Q_a[α, j] Q_a[α', j]`` for every pair of lines, ``(P, r², n_a)``."""
        return (self.first[:, :, None, :] * self.first[:, None, :, :]).flatten(1, 2)

    def gram(self, weights: torch.Tensor) -> torch.Tensor:
        """``Vᵀ diag(w_k) V`` for each channel ``k`` of ``weights`` ``(P, K, n_a, n_b)``, ``(P, K, m, m)``.

        ``A[α, α', j_b] = Σ_{j_a} Q_a[α, j_a] w[j_a, j_b] Q_a[α', j_a]`` once, then each
        pixel's row of the Gram matrix by line: ``Σ_{j_b} A[a_i, α', j_b] Q_b[b_i, j_b]
        Q_b[b_{i'}, j_b]`` for the pixels ``i'`` on line ``α'``.
        """
        n_models, n_lines = self.first.shape[:2]
        pairs = self._line_pairs()
        out = weights.new_empty(n_models, weights.shape[1], self.n_pixels, self.n_pixels)
        for k in range(weights.shape[1]):
            lines = (pairs @ weights[:, k]).reshape(n_models, n_lines, n_lines, weights.shape[-1])  # A
            for chunk in self._chunks():
                scaled = lines[:, self.line[chunk]] * self.rest[:, chunk, None, :]  # (P, c, r, n_b)
                by_line = torch.einsum("pcaj,pasj->pcas", scaled, self.padded)
                out[:, k, chunk] = by_line[:, :, self.line, self.slot]
        return out

    def quadratic_diagonal(self, matrices: torch.Tensor) -> torch.Tensor:
        """``diag(V X_k Vᵀ)`` for symmetric ``X_k`` ``(P, K, m, m)``, ``(P, K, n_a, n_b)``: the reverse of :meth:`gram`."""
        n_models, n_lines, n_first = self.first.shape
        pairs = self._line_pairs().transpose(-1, -2)  # (P, n_a, r²)
        out = matrices.new_empty(n_models, matrices.shape[1], n_first, self.rest.shape[-1])
        for k in range(matrices.shape[1]):
            lines = matrices.new_zeros(n_models, n_lines, n_lines, self.rest.shape[-1])  # Y, (P, r, r, n_b)
            for chunk in self._chunks():
                rows = matrices[:, k, chunk]  # (P, c, m)
                by_line = rows.new_zeros(*rows.shape[:2], n_lines, self.padded.shape[2])
                by_line[:, :, self.line, self.slot] = rows
                spread = torch.einsum("pcas,pasj->pcaj", by_line, self.padded) * self.rest[:, chunk, None, :]
                lines.index_add_(1, self.line[chunk], spread)
            out[:, k] = pairs @ lines.flatten(1, 2)
        return out

    def values_at(self, x: torch.Tensor) -> torch.Tensor:
        """``Vᵀ x``, i.e. ``(Q x)`` at the pixels, for ``x`` ``(P, ..., n_a, n_b)`` → ``(P, ..., m)``."""
        lead = x.shape[1:-2]
        flat = x.reshape(x.shape[0], math.prod(lead), *x.shape[-2:])  # (P, L, n_a, n_b)
        on_lines = torch.einsum("pra,plaj->plrj", self.first, flat)
        by_line = torch.einsum("plrj,prsj->plrs", on_lines, self.padded)
        return by_line[:, :, self.line, self.slot].reshape(x.shape[0], *lead, self.n_pixels)

    def spread(self, u: torch.Tensor) -> torch.Tensor:
        """``V u``, i.e. ``Qᵀ`` of the grid vector that holds ``u`` ``(P, ..., m)`` at the pixels, ``(P, ..., n_a, n_b)``."""
        lead = u.shape[1:-1]
        flat = u.reshape(u.shape[0], math.prod(lead), u.shape[-1])  # (P, L, m)
        by_line = flat.new_zeros(*flat.shape[:2], *self.padded.shape[1:3])
        by_line[:, :, self.line, self.slot] = flat
        on_lines = torch.einsum("plrs,prsj->plrj", by_line, self.padded)
        out = torch.einsum("pra,plrj->plaj", self.first, on_lines)
        return out.reshape(u.shape[0], *lead, *out.shape[-2:])
