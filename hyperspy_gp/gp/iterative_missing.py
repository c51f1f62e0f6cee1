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
(factorised once per evaluation, one structured solve per missing value, as in
:mod:`~hyperspy_gp.gp.schur`),

.. math::

    P^{-1} r = G r - G E_M C̃^{-1} (G r)_M, \qquad
    \log\det P = \log\det Σ̃ + \log\det C̃ .

Probes.  ``z = (L ε)_O`` with ``L Lᵀ = Σ̃`` (a full-grid draw restricted to ``O``) has
covariance ``P``, so ``P^{-1/2} z`` is a valid probe of ``log det(P^{-1/2} Σ_{OO}
P^{-1/2})``; CG on ``Σ_{OO} u = z`` is Lanczos on that matrix, with weight ``zᵀ P^{-1}
z``.  The gradient's trace uses ``w = P^{-1} z`` (``E[u wᵀ] = Σ_{OO}^{-1}``).

Control variate.  ``∂ log det P = Σ_j tr((M_j − M_j S_j M_j) ∂Λ_j)`` with ``M_j =
Λ_j^{-1}`` and ``M_j S_j M_j`` the ``j``-th diagonal block of ``Qᵀ G E_M C̃^{-1} E_Mᵀ G
Q`` (:attr:`SchurPreconditioner.schur_weights`), exact; the probes then only estimate
the small ``log det(P^{-1} Σ_{OO})`` part, as on the complete grid.

This path serves a few missing pixels (dead pixels, a small ``navigation_mask``): the
columns ``G E_M`` take ``|M| T · n T`` values, limited like the Schur path's
(:data:`~hyperspy_gp.gp.schur.MAX_SCHUR_ENTRIES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyperspy_gp.gp.cholesky import safe_cholesky
from hyperspy_gp.gp.iterative import ICMOperator, KroneckerPreconditioner, preconditioner_surrogate
from hyperspy_gp.gp.schur import MAX_SCHUR_ENTRIES


def max_missing_pixels(n_pixels: int, n_tasks: int) -> int:
    """The most missing pixels this path serves on a grid of ``n_pixels`` with ``n_tasks`` maps per model.

    Examples
    --------
    >>> max_missing_pixels(128 * 128, 6), max_missing_pixels(128 * 128, 1)
    (56, 2048)
    """
    return MAX_SCHUR_ENTRIES // (n_tasks * n_pixels * n_tasks)


def _flat_grid(x: torch.Tensor, n_axes: int) -> torch.Tensor:
    """Channel-first ``(..., *grid)`` → ``(..., n)``."""
    return x.reshape(*x.shape[: x.dim() - n_axes], -1)


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

    Channel-first tensors ``(P, R, T, *grid)`` with zeros at the missing pixels.
    Columns are ordered ``k = s · |M| + i`` (map ``s``, missing pixel ``i``).
    """

    base: KroneckerPreconditioner  # Σ̃ on the complete grid
    mask: torch.Tensor  # (*grid), 1 where observed
    missing: torch.Tensor  # flat indices of the missing pixels, (|M|,)
    columns: torch.Tensor  # G E_M, (P, T|M|, T, *grid)
    cholesky: torch.Tensor  # chol(C̃), (P, T|M|, T|M|)

    @classmethod
    def build(cls, base: KroneckerPreconditioner, observed: torch.Tensor) -> SchurPreconditioner:
        """Factorise ``C̃ = (Σ̃^{-1})_{MM}`` for the missing pixels of the boolean grid ``observed``."""
        missing = torch.nonzero(~observed.reshape(-1)).squeeze(-1)
        n_models, n_tasks = base.cholesky.shape[0], base.cholesky.shape[-1]
        n_missing, n_axes = missing.numel(), observed.dim()
        sources = base.cholesky.new_zeros(n_models, n_tasks, n_missing, n_tasks, observed.numel())
        for task in range(n_tasks):
            sources[:, task, torch.arange(n_missing), task, missing] = 1.0
        sources = sources.reshape(n_models, n_tasks * n_missing, n_tasks, *observed.shape)
        columns = base.solve(sources)
        del sources
        restricted = _flat_grid(columns, n_axes)[..., missing].reshape(n_models, n_tasks * n_missing, -1)
        # A principal block of Σ̃⁻¹: positive definite, as well conditioned as Σ̃.
        chol, _ = safe_cholesky(0.5 * (restricted + restricted.transpose(-1, -2)))
        return cls(base, observed.to(columns.dtype), missing, columns, chol)

    @property
    def n_axes(self) -> int:
        return self.mask.dim()

    def _at_missing(self, x: torch.Tensor) -> torch.Tensor:
        """``(P, R, T, *grid)`` → ``(P, T|M|, R)``, columns ordered as :attr:`columns`."""
        values = _flat_grid(x, self.n_axes)[..., self.missing]  # (P, R, T, |M|)
        return values.reshape(*values.shape[:2], -1).transpose(1, 2)

    def logdet(self) -> torch.Tensor:
        """``log det P = log det Σ̃ + log det C̃`` per model, ``(P,)``."""
        diag = torch.diagonal(self.cholesky, dim1=-2, dim2=-1)
        return self.base.logdet() + 2.0 * torch.log(diag).sum(-1)

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """``P^{-1} x`` for ``x`` zero at the missing pixels (the result is too)."""
        full = self.base.solve(x)
        weights = torch.cholesky_solve(self._at_missing(full), self.cholesky)  # (P, T|M|, R)
        return (full - torch.einsum("pk...,pkr->pr...", self.columns, weights)) * self.mask

    def factor_mul(self, eps: torch.Tensor) -> torch.Tensor:
        """``z = (L ε)_O``: full-grid draws of ``N(0, Σ̃)`` restricted to the observed pixels."""
        return self.base.factor_mul(eps) * self.mask

    def schur_weights(self) -> torch.Tensor:
        """``M_j S_j M_j`` per eigenvector ``j`` (see the module docstring), ``(P, *grid, T, T)``."""
        n_models, n_columns = self.columns.shape[:2]
        flat = self.columns.reshape(n_models, n_columns, -1)
        h = torch.linalg.solve_triangular(self.cholesky, flat, upper=False)  # rows of G E_M L⁻ᵀ
        rotated = self.base._rotate(h.reshape(self.columns.shape), transpose=True)
        return torch.einsum("pks...,pkt...->p...st", rotated, rotated)

    def probe_weights(self, eps: torch.Tensor, drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``w = P^{-1} z`` of the probes ``z`` (``drawn``) and their Lanczos weights ``zᵀ P^{-1} z``, ``(P, R)``."""
        whitened = self.solve(drawn)
        return whitened, (drawn * whitened).sum(dim=tuple(range(2, drawn.dim())))

    def surrogate(self, values, task_covariance, noise, whitened: torch.Tensor) -> torch.Tensor:
        """The control variate of the log-determinant's gradient, with the Schur complement's part."""
        return preconditioner_surrogate(self.base, values, task_covariance, noise, whitened, self.schur_weights())
