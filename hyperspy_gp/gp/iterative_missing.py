r"""Missing pixels on the iterative path: CG on the observed values, exactly.

With ``O`` the observed and ``M`` the missing values of the grid, the likelihood needs
``Σ_{OO}`` (any stationary kernel, :mod:`~hyperspy_gp.gp.iterative`).  Vectors stay on
the full grid with zeros at ``M``: ``Σ_{OO} v`` is the FFT product ``Σ v`` with its
values at ``M`` set to zero (:class:`ObservedOperator`), so CG, the stochastic
log-determinant and the gradient's bilinear forms of the iterative path carry over
unchanged.

Preconditioner.  ``P = Σ̃_{OO}``, the observed block of the separable-kernel covariance
``Σ̃ = Q Λ Qᵀ`` that preconditions the complete grid (eigenvalues corrected towards
``K``).  A principal block keeps the spectral bounds of ``Σ̃^{-1} Σ``, so CG needs as
few iterations as on the complete grid.  With ``G = Σ̃^{-1}`` and ``C̃ = G_{MM}``
(factorised once per evaluation),

.. math::

    P^{-1} r = G r - G E_M C̃^{-1} (G r)_M, \qquad
    \log\det P = \log\det Σ̃ + \log\det C̃ .

Probes.  ``z = (L ε)_O`` with ``L Lᵀ = Σ̃`` (a full-grid draw restricted to ``O``) has
covariance ``P``, so ``P^{-1/2} z`` is a valid probe of ``log det(P^{-1/2} Σ_{OO}
P^{-1/2})``; CG on ``Σ_{OO} u = z`` is Lanczos on that matrix, with weight ``zᵀ P^{-1}
z``.  The gradient's trace uses ``w = P^{-1} z`` (``E[u wᵀ] = Σ_{OO}^{-1}``).

Control variate.  ``∂ log det P = Σ_j tr((M_j − M_j S_j M_j) ∂Λ_j)`` with ``M_j =
Λ_j^{-1}`` and ``M_j S_j M_j`` the ``j``-th diagonal block of ``Qᵀ G E_M C̃^{-1} E_Mᵀ G
Q`` (:meth:`SchurPreconditioner.schur_weights`), exact; the probes then only estimate
the small ``log det(P^{-1} Σ_{OO})`` part, as on the complete grid.

No column ``G E_M`` is formed: in the eigenbasis the missing pixels are the rows ``V``
of ``Q``, so ``C̃ = Vᵀ M V`` per pair of maps and ``P^{-1}`` costs one rotation each way
plus two products with ``V`` (``n × |M|``).  Forming ``C̃`` and ``S_j`` grows as ``T² n
|M|²``, so this path serves a few missing pixels (dead pixels, a small
``navigation_mask``: :func:`max_missing_pixels`, e.g. 282 on 128² × 6 maps).
Measured per evaluation on 2 CPU cores, 128² × 6 maps, in one run of
``bench_missing.py --kernel matern``: complete 1.7 s, 20 missing pixels 2.5 s, 164 (1 %
at random) 3.1 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hyperspy_gp.gp.cholesky import safe_cholesky
from hyperspy_gp.gp.iterative import ICMOperator, KroneckerPreconditioner, preconditioner_surrogate
from hyperspy_gp.gp.tensor import blocked_gram, kron_rows

#: Largest :func:`missing_pixel_cost` of one evaluation: 6e10 multiply-adds, about 2 s on
#: 2 CPU cores, as much as a whole evaluation of a complete 128² grid with 6 maps.
#: Measured per evaluation, 128² × 6 maps: complete 2.1 s; 20, 56, 150 and 300 missing
#: pixels 2.5, 2.7, 3.3 and 4.6 s.
MAX_MISSING_COST = 6e10


def max_missing_pixels(n_pixels: int, n_tasks: int, n_models: int = 1) -> int:
    """The most missing pixels this path serves on a grid of ``n_pixels`` for ``n_models`` models of ``n_tasks`` maps.

    Those whose cost per likelihood evaluation (:func:`missing_pixel_cost`, all models)
    stays within :data:`MAX_MISSING_COST`.

    Examples
    --------
    >>> max_missing_pixels(128 * 128, 6), max_missing_pixels(256 * 256, 12), max_missing_pixels(128 * 128, 1, 6)
    (282, 76, 547)
    """
    per_pixel_pair = n_models * n_tasks * (n_tasks + 1) * n_pixels
    n_missing = math.isqrt(int(MAX_MISSING_COST // per_pixel_pair))
    while n_missing > 0 and n_models * missing_pixel_cost(n_pixels, n_missing, n_tasks) > MAX_MISSING_COST:
        n_missing -= 1
    return n_missing


def missing_pixel_cost(n_pixels: int, n_missing: int, n_tasks: int) -> int:
    """Multiply-adds per evaluation spent on the missing pixels, per model.

    Forming ``C̃`` and the control variate's ``S_j`` (``T(T+1)/2`` products of ``n ×
    |M|`` by ``|M| × |M|`` each) and factorising and inverting ``C̃`` (about ``(T|M|)³``).
    """
    return n_tasks * (n_tasks + 1) * n_pixels * n_missing**2 + (n_tasks * n_missing) ** 3


class ObservedOperator(ICMOperator):
    """``Σ_{OO} x``: the FFT product ``Σ x`` with the missing values set to zero."""

    def __init__(self, toeplitz, task_covariance, noise, observed: torch.Tensor) -> None:
        super().__init__(toeplitz, task_covariance, noise)
        self.mask = observed.to(task_covariance.dtype)  # (*grid), 1 where observed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return super().__call__(x) * self.mask


@dataclass
class SchurPreconditioner:
    """``P = Σ̃_{OO}`` applied, factorised and differentiated through the missing values.

    Channel-first tensors ``(P, R, T, *grid)`` with zeros at the missing pixels.  In the
    eigenbasis ``Q`` of ``Σ̃`` the missing pixels are the rows ``V`` of ``Q`` (``V[j, i] =
    q_j(i)``), so ``C̃ = Vᵀ M V`` per pair of maps, with ``M_j = Λ_j^{-1}``; its rows and
    columns are ordered ``k = s · |M| + i`` (map ``s``, missing pixel ``i``).
    """

    base: KroneckerPreconditioner  # Σ̃ on the complete grid
    mask: torch.Tensor  # (*grid), 1 where observed
    rows: torch.Tensor  # V, (P, n, |M|)
    cholesky: torch.Tensor  # chol(C̃), (P, T|M|, T|M|)

    @classmethod
    def build(cls, base: KroneckerPreconditioner, observed: torch.Tensor) -> SchurPreconditioner:
        """Factorise ``C̃ = (Σ̃^{-1})_{MM}`` for the missing pixels of the boolean grid ``observed``."""
        rows = kron_rows(base.eigenvectors, torch.nonzero(~observed))  # q_j(i), (P, |M|, *grid)
        rows = rows.flatten(2).transpose(1, 2).contiguous()  # (P, n, |M|)
        c = blocked_gram(rows, cls._flat_blocks(base.inverse))  # (P, T, |M|, T, |M|)
        c = c.reshape(rows.shape[0], c.shape[1] * c.shape[2], -1)
        # A principal block of Σ̃⁻¹: positive definite, as well conditioned as Σ̃.
        chol, _ = safe_cholesky(0.5 * (c + c.transpose(-1, -2)))
        return cls(base, observed.to(rows.dtype), rows, chol)

    @staticmethod
    def _flat_blocks(blocks: torch.Tensor) -> torch.Tensor:
        """``(P, *grid, T, T)`` → ``(P, n, T, T)``."""
        return blocks.reshape(blocks.shape[0], -1, *blocks.shape[-2:])

    @property
    def n_missing(self) -> int:
        return self.rows.shape[-1]

    def logdet(self) -> torch.Tensor:
        """``log det P = log det Σ̃ + log det C̃`` per model, ``(P,)``."""
        diag = torch.diagonal(self.cholesky, dim1=-2, dim2=-1)
        return self.base.logdet() + 2.0 * torch.log(diag).sum(-1)

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """``P^{-1} x = Q (a − M V C̃^{-1} Vᵀ a)`` with ``a = M Qᵀ x``, for ``x`` zero at the missing pixels."""
        inverse = self.base.inverse
        a = torch.einsum("p...st,prt...->prs...", inverse, self.base._rotate(x, transpose=True))
        flat = a.reshape(*a.shape[:3], -1)  # (P, R, T, n)
        rows = self.rows.unsqueeze(1)  # broadcast over the vectors R
        at_missing = (flat @ rows).flatten(2).transpose(1, 2)  # (G r)_M, (P, T|M|, R)
        weights = torch.cholesky_solve(at_missing, self.cholesky)
        weights = weights.transpose(1, 2).reshape(*flat.shape[:3], self.n_missing)  # (P, R, T, |M|)
        spread = (weights @ rows.transpose(-1, -2)).reshape(a.shape)  # Qᵀ E_M w
        a = a - torch.einsum("p...st,prt...->prs...", inverse, spread)
        return self.base._rotate(a, transpose=False) * self.mask

    def factor_mul(self, eps: torch.Tensor) -> torch.Tensor:
        """``z = (L ε)_O``: full-grid draws of ``N(0, Σ̃)`` restricted to the observed pixels."""
        return self.base.factor_mul(eps) * self.mask

    def schur_weights(self) -> torch.Tensor:
        """``M_j S_j M_j`` per eigenvector ``j`` (see the module docstring), ``(P, *grid, T, T)``.

        ``S_j[s, t] = Σ_{i, i'} V[j, i] (C̃^{-1})[(s, i), (t, i')] V[j, i']``.
        """
        inverse = self._flat_blocks(self.base.inverse)
        n_models, n_tasks = inverse.shape[0], inverse.shape[-1]
        x = torch.cholesky_inverse(self.cholesky).reshape(n_models, n_tasks, self.n_missing, n_tasks, -1)
        s_blocks = torch.empty_like(inverse)
        for s in range(n_tasks):
            for t in range(s, n_tasks):
                s_blocks[:, :, s, t] = s_blocks[:, :, t, s] = ((self.rows @ x[:, s, :, t]) * self.rows).sum(-1)
        return (inverse @ s_blocks @ inverse).reshape(self.base.inverse.shape)

    def probe_weights(self, eps: torch.Tensor, drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``w = P^{-1} z`` of the probes ``z`` (``drawn``) and their Lanczos weights ``zᵀ P^{-1} z``, ``(P, R)``."""
        whitened = self.solve(drawn)
        return whitened, (drawn * whitened).sum(dim=tuple(range(2, drawn.dim())))

    def surrogate(self, values, task_covariance, noise, whitened: torch.Tensor) -> torch.Tensor:
        """The control variate of the log-determinant's gradient, with the Schur complement's part."""
        return preconditioner_surrogate(self.base, values, task_covariance, noise, whitened, self.schur_weights())
