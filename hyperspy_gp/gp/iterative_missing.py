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

No column ``G E_M`` is formed, nor the rows ``V`` of ``Q`` at the missing pixels
(:class:`~hyperspy_gp.gp.pixel_rows.PixelRows` keeps them by scan line), and with the
task covariance whitened once, ``C̃`` splits into ``T`` Gram matrices ``G_k = Vᵀ
diag(e_k) V`` of ``|M| × |M|`` (:class:`SchurPreconditioner`).  Per evaluation the
missing pixels cost about ``T |M|³`` plus the Gram matrices (:func:`missing_pixel_cost`);
the path serves masks within :data:`MAX_MISSING_COST`, e.g. 3536 pixels scattered at
random on 128² × 6 maps (:func:`max_missing_pixels`), and on a GPU within
:data:`MAX_MISSING_COST_GPU` (any mask of 128² × 6 maps; at 256² × 6 up to about 20 000
missing pixels, so a masked quarter disc of 18 689).  On a sparse scan ``P`` is built
from the few observed pixels instead (:class:`ObservedBlockPreconditioner`, one Gram
matrix), whichever side costs less (:func:`observed_block_preconditioner`).  Measured
per evaluation on 2 CPU cores, 128² × 6 maps, in runs of ``bench_missing.py --kernel
matern``: complete 1.6 s; 20 missing pixels 1.9 s; 1, 5 and 20 % at random 2.2, 2.6 and
9.4 s; 90 % at random 2.7 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hyperspy_gp.gp.cholesky import safe_cholesky
from hyperspy_gp.gp.iterative import ICMOperator, KroneckerPreconditioner, preconditioner_surrogate
from hyperspy_gp.gp.likelihood import whiten_tasks
from hyperspy_gp.gp.pixel_rows import PixelRows
from hyperspy_gp.gp.tensor import blocks_dot

#: Largest :func:`missing_pixel_cost` of one evaluation, all models: 3e11 multiply-adds,
#: about 5 s on 2 CPU cores.  Measured on single evaluations, 128² × 6 maps, missing
#: pixels at random (one run): complete 1.7 s; 819, 1638, 3277 and 6554 missing
#: pixels (5, 10, 20 and 40 %) 2.4, 3.5, 7.9 and 26 s, of which building the
#: preconditioner and the Schur weights 0.5, 1.3, 4.2 and 20 s.
MAX_MISSING_COST = 3e11
#: The same limit on a GPU (``device="cuda"``): 5e13 multiply-adds, about 10 s per
#: evaluation on an NVIDIA H200 in float64.  Measured there on single evaluations
#: (fitted by ``bench_missing.run_case`` with the CPU limit lifted, one run each):
#: 128² × 6 maps with a masked quarter disc (4705 pixels, cost 6.7e11) 0.26 s, half the
#: pixels missing at random (8227, 3.3e12) 0.87 s, a 256² × 6 quarter disc (18 689,
#: 4.0e13) 9.2 s.  Consumer GPUs, slow in float64, take longer; the GPU memory check
#: (:func:`~hyperspy_gp.memory.check_device_memory`) bounds the ``T m²`` blocks either way.
MAX_MISSING_COST_GPU = 5e13


def missing_cost_limit(device: str = "cpu") -> float:
    """Largest :func:`missing_pixel_cost` of one evaluation, all models, on ``device``.

    Examples
    --------
    >>> missing_cost_limit("cpu") == MAX_MISSING_COST, missing_cost_limit("cuda:0") == MAX_MISSING_COST_GPU
    (True, True)
    """
    return MAX_MISSING_COST_GPU if str(device).startswith("cuda") else MAX_MISSING_COST


def max_missing_pixels(grid_shape: tuple[int, ...], n_tasks: int, n_models: int = 1, side: str = "missing",
                       device: str = "cpu") -> int:
    """The most pixels, scattered at random, that this path serves from one ``side`` of the mask.

    ``side="missing"``: the most missing pixels; ``"observed"``: the most measured ones (a
    sparse scan).  Those whose cost per likelihood evaluation (:func:`block_cost`, all
    ``n_models`` models of ``n_tasks`` maps) stays within the ``device``'s limit
    (:func:`missing_cost_limit`).  Pixels on fewer lines cost less.

    Examples
    --------
    >>> max_missing_pixels((128, 128), 6), max_missing_pixels((256, 256), 12), max_missing_pixels((128, 128), 1, 6)
    (3536, 2216, 3536)
    >>> max_missing_pixels((128, 128), 6, side="observed")
    3596
    >>> max_missing_pixels((128, 128), 6, device="cuda"), max_missing_pixels((256, 256), 6, device="cuda")
    (16384, 20038)
    """
    limit = missing_cost_limit(device)
    low, high = 0, math.prod(grid_shape)
    while low < high:  # the cost grows with the pixels
        middle = (low + high + 1) // 2
        if n_models * block_cost(grid_shape, middle, n_tasks, side=side) <= limit:
            low = middle
        else:
            high = middle - 1
    return low


def block_cost(grid_shape: tuple[int, ...], n_block: int, n_tasks: int, lines: int | None = None,
               most_on_a_line: int | None = None, side: str = "missing") -> int:
    """Multiply-adds per evaluation of building ``P = Σ̃_{OO}`` from ``n_block`` pixels of one ``side``, per model.

    From the missing pixels (:class:`SchurPreconditioner`): ``T`` Gram matrices and ``T``
    diagonals of the Schur weights, ``2 T (r² n + |M| r s n_b)``
    (:mod:`~hyperspy_gp.gp.pixel_rows`); from the observed ones
    (:class:`ObservedBlockPreconditioner`): one Gram matrix and ``T`` diagonals.  Either
    way ``T`` factorisations and inverses of ``n_block × n_block``, ``T n_block³``.
    ``lines`` (``r``) and ``most_on_a_line`` (``s``) are those of the block's pixels
    (:func:`pixel_lines`); by default those of pixels scattered at random (``s`` the
    mean plus three standard deviations).
    """
    n_first, n = grid_shape[0], math.prod(grid_shape)
    if lines is None:
        per_line = n_block / n_first
        lines = min(n_block, n_first)
        most_on_a_line = min(n // n_first, math.ceil(per_line + 3.0 * math.sqrt(per_line)) + 1)
    rows = lines**2 * n + n_block * lines * most_on_a_line * (n // n_first)
    grams = n_tasks if side == "missing" else 1
    return (grams + n_tasks) * rows + n_tasks * n_block**3


def missing_pixel_cost(observed: np.ndarray, n_tasks: int) -> int:
    """Multiply-adds per evaluation spent on the missing pixels of the boolean grid ``observed``, per model.

    The cheaper of the two constructions of the preconditioner (:func:`block_cost`),
    which :func:`observed_block_preconditioner` takes.
    """
    return min(_side_costs(np.asarray(observed, dtype=bool), n_tasks))


def _side_costs(observed: np.ndarray, n_tasks: int) -> tuple[int, int]:
    """:func:`block_cost` of building ``P`` from the missing and from the observed pixels of ``observed``."""
    n_missing = int((~observed).sum())
    return (block_cost(observed.shape, n_missing, n_tasks, *pixel_lines(~observed)),
            block_cost(observed.shape, observed.size - n_missing, n_tasks, *pixel_lines(observed), side="observed"))


def pixel_lines(pixels: np.ndarray) -> tuple[int, int]:
    """Lines (first-axis coordinates) of the boolean grid ``pixels`` holding a ``True`` pixel, and the most on one."""
    per_line = np.asarray(pixels, dtype=bool).reshape(pixels.shape[0], -1).sum(axis=1)
    return int((per_line > 0).sum()), int(per_line.max())


def observed_block_preconditioner(base: KroneckerPreconditioner,
                                  observed: torch.Tensor) -> SchurPreconditioner | ObservedBlockPreconditioner:
    """``P = Σ̃_{OO}`` built the cheaper way for the mask (:func:`block_cost`).

    :class:`SchurPreconditioner` from the missing pixels, or
    :class:`ObservedBlockPreconditioner` from the observed ones (a sparse scan).
    """
    from_missing, from_observed = _side_costs(observed.cpu().numpy(), base.task_covariance.shape[-1])
    if from_missing <= from_observed:
        return SchurPreconditioner.build(base, observed)
    return ObservedBlockPreconditioner.build(base, observed)


class ObservedOperator(ICMOperator):
    """``Σ_{OO} x``: the FFT product ``Σ x`` with the missing values set to zero."""

    def __init__(self, toeplitz, task_covariance, noise, observed: torch.Tensor) -> None:
        super().__init__(toeplitz, task_covariance, noise)
        self.mask = observed.to(task_covariance.dtype)  # (*grid), 1 where observed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return super().__call__(x) * self.mask


class _ObservedBlock:
    """What both constructions of ``P = Σ̃_{OO}`` share: its probes and its control variate.

    Subclasses provide ``base`` (Σ̃ on the complete grid), ``mask`` (``(*grid)``, 1 where
    observed), :meth:`solve` and :meth:`schur_weights`.
    """

    base: KroneckerPreconditioner
    mask: torch.Tensor

    def factor_mul(self, eps: torch.Tensor) -> torch.Tensor:
        """``z = (L ε)_O``: full-grid draws of ``N(0, Σ̃)`` restricted to the observed pixels."""
        return self.base.factor_mul(eps) * self.mask

    def probe_weights(self, eps: torch.Tensor, drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``w = P^{-1} z`` of the probes ``z`` (``drawn``) and their Lanczos weights ``zᵀ P^{-1} z``, ``(P, R)``."""
        whitened = self.solve(drawn)
        return whitened, (drawn * whitened).sum(dim=tuple(range(2, drawn.dim())))

    def surrogate(self, values, task_covariance, noise, whitened: torch.Tensor) -> torch.Tensor:
        """The control variate of the log-determinant's gradient, with the observed block's part."""
        return preconditioner_surrogate(self.base, values, task_covariance, noise, whitened, self.schur_weights())


@dataclass
class SchurPreconditioner(_ObservedBlock):
    """``P = Σ̃_{OO}`` applied, factorised and differentiated through the missing values (few of them).

    Channel-first tensors ``(P, R, T, *grid)`` with zeros at the missing pixels.  In the
    eigenbasis ``Q`` of ``Σ̃`` the missing pixels are the rows ``V`` of ``Q``
    (:class:`~hyperspy_gp.gp.pixel_rows.PixelRows`), and ``M_j = (λ_j B + D)^{-1} = W
    diag_k(e_{jk}) Wᵀ`` with ``W = D^{-1/2} R``, ``R Γ Rᵀ = D^{-1/2} B D^{-1/2}`` and
    ``e_{jk} = 1 / (λ_j γ_k + 1)``.  So ``C̃ = Vᵀ M V = (W ⊗ I) diag_k(G_k) (W ⊗ I)ᵀ``
    with ``G_k = Vᵀ diag(e_k) V``: ``T`` factorisations of ``|M| × |M|`` instead of one of
    ``T|M| × T|M|``.  Nothing here is differentiated (the preconditioner is a constant of
    each evaluation), so the eigendecomposition of ``B`` is safe where its eigenvalues
    repeat.
    """

    base: KroneckerPreconditioner  # Σ̃ on the complete grid
    mask: torch.Tensor  # (*grid), 1 where observed
    rows: PixelRows  # V at the missing pixels
    whitening: torch.Tensor  # W = D^{-1/2} R, (P, T, K)
    unwhitening: torch.Tensor  # W^{-T} = D^{1/2} R, (P, T, K)
    scales: torch.Tensor  # e_{jk}, (P, K, n_a, n_b)
    inverse: torch.Tensor  # G_k^{-1}, (P, K, |M|, |M|)
    logdet_c: torch.Tensor  # log det C̃, (P,)

    @classmethod
    def build(cls, base: KroneckerPreconditioner, observed: torch.Tensor) -> SchurPreconditioner:
        """Factorise ``C̃ = (Σ̃^{-1})_{MM}`` for the missing pixels of the boolean grid ``observed``."""
        rows = PixelRows.build(base.eigenvectors, torch.nonzero(~observed))
        root, gamma, rotation = whiten_tasks(base.task_covariance, base.diagonal)
        lam = base.eigenvalues.reshape(base.eigenvalues.shape[0], 1, observed.shape[0], -1)
        scales = 1.0 / (lam * gamma[:, :, None, None] + 1.0)
        # Principal blocks of diag(e_k) in an orthonormal basis: eigenvalues in (0, 1].
        chol, _ = safe_cholesky(rows.gram(scales))
        # log det C̃ = Σ_k log det G_k + |M| log det(W Wᵀ), and W Wᵀ = D^{-1}.
        diag = torch.diagonal(chol, dim1=-2, dim2=-1)
        logdet_c = 2.0 * torch.log(diag).flatten(1).sum(-1) - rows.n_pixels * torch.log(base.diagonal).sum(-1)
        # The inverse, not the factor: one matrix product per CG iteration is several
        # times faster than a batched triangular solve, and the Schur weights need it.
        return cls(base, observed.to(rows.rest.dtype), rows, rotation / root[:, :, None],
                   rotation * root[:, :, None], scales, torch.cholesky_inverse(chol), logdet_c)

    def logdet(self) -> torch.Tensor:
        """``log det P = log det Σ̃ + log det C̃`` per model, ``(P,)``."""
        return self.base.logdet() + self.logdet_c

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """``P^{-1} x = Q (a − M V C̃^{-1} Vᵀ a)`` with ``a = M Qᵀ x``, for ``x`` zero at the missing pixels."""
        inverse = self.base.inverse
        a = blocks_dot(inverse, self.base._rotate(x, transpose=True))
        grid = a.shape[3:]
        at_missing = self.rows.values_at(a.reshape(*a.shape[:3], grid[0], -1))  # (G x)_M, (P, R, T, |M|)
        # C̃^{-1} = (W^{-T} ⊗ I) diag_k(G_k^{-1}) (W^{-1} ⊗ I)
        per_channel = torch.einsum("ptk,prtm->pkmr", self.unwhitening, at_missing)
        per_channel = self.inverse @ per_channel
        weights = torch.einsum("ptk,pkmr->prtm", self.unwhitening, per_channel)
        spread = self.rows.spread(weights).reshape(a.shape)  # Qᵀ E_M w
        a = a - blocks_dot(inverse, spread)
        return self.base._rotate(a, transpose=False) * self.mask

    def schur_weights(self) -> torch.Tensor:
        """``M_j S_j M_j = W diag_k(e_{jk}² h_{jk}) Wᵀ`` per eigenvector ``j``, ``(P, *grid, T, T)``.

        ``S_j[s, t] = Σ_{i, i'} V[j, i] (C̃^{-1})[(s, i), (t, i')] V[j, i']`` (see the module
        docstring) and ``h_{jk} = (V G_k^{-1} Vᵀ)_{jj}``.
        """
        h = self.rows.quadratic_diagonal(self.inverse)  # (P, K, n_a, n_b)
        weights = (self.scales**2 * h).flatten(2)
        blocks = torch.einsum("psk,pkj,ptk->pjst", self.whitening, weights, self.whitening)
        return blocks.reshape(*self.base.eigenvalues.shape, *blocks.shape[-2:])


@dataclass
class ObservedBlockPreconditioner(_ObservedBlock):
    """``P = Σ̃_{OO}`` formed from the observed pixels: the construction for sparse scans.

    With ``V_O`` the rows of ``Q`` at the observed pixels (``V_Oᵀ V_O = I``) and ``λ_j B +
    D = U diag_k(λ_j γ_k + 1) Uᵀ``, ``U = D^{1/2} R`` (:class:`SchurPreconditioner`),
    ``P = (U ⊗ I) diag_k(I + γ_k K̃_{OO}) (U ⊗ I)ᵀ`` where ``K̃_{OO} = V_Oᵀ diag(λ) V_O`` is
    the preconditioner's kernel between the observed pixels: one Gram matrix and ``T``
    factorisations of ``|O| × |O|``, and ``P^{-1}`` needs no rotation.  The control
    variate needs ``∂ log det P = Σ_j tr(Y_j ∂Λ_j)`` with ``Y_j`` the ``j``-th diagonal block
    of ``V_O P^{-1} V_Oᵀ``, ``W diag_k(h_{jk}) Wᵀ`` with ``W = U^{-T}`` and ``h_{jk} = (V_O
    H_k^{-1} V_Oᵀ)_{jj}``.
    """

    base: KroneckerPreconditioner  # Σ̃ on the complete grid
    mask: torch.Tensor  # (*grid), 1 where observed
    rows: PixelRows  # V_O at the observed pixels
    index: torch.Tensor  # the observed pixels in the flattened grid, (|O|,)
    whitening: torch.Tensor  # W = U^{-T} = D^{-1/2} R, (P, T, K)
    scales: torch.Tensor  # e_{jk} = 1 / (λ_j γ_k + 1), (P, K, n)
    inverse: torch.Tensor  # H_k^{-1} = (I + γ_k K̃_OO)^{-1}, (P, K, |O|, |O|)
    logdet_p: torch.Tensor  # log det P, (P,)

    @classmethod
    def build(cls, base: KroneckerPreconditioner, observed: torch.Tensor) -> ObservedBlockPreconditioner:
        """Factorise ``P`` on the observed pixels of the boolean grid ``observed``."""
        rows = PixelRows.build(base.eigenvectors, torch.nonzero(observed))
        root, gamma, rotation = whiten_tasks(base.task_covariance, base.diagonal)
        lam = base.eigenvalues.reshape(base.eigenvalues.shape[0], 1, observed.shape[0], -1)
        kernel = rows.gram(lam)  # K̃_OO, (P, 1, |O|, |O|)
        eye = torch.eye(rows.n_pixels, dtype=kernel.dtype, device=kernel.device)
        chol, _ = safe_cholesky(eye + gamma[:, :, None, None] * kernel)  # eigenvalues ≥ 1
        # log det P = Σ_k log det H_k + |O| log det(U Uᵀ), and U Uᵀ = D.
        diag = torch.diagonal(chol, dim1=-2, dim2=-1)
        logdet = 2.0 * torch.log(diag).flatten(1).sum(-1) + rows.n_pixels * torch.log(base.diagonal).sum(-1)
        index = torch.nonzero(observed.reshape(-1), as_tuple=True)[0]
        scales = (1.0 / (lam * gamma[:, :, None, None] + 1.0)).flatten(2)
        return cls(base, observed.to(kernel.dtype), rows, index, rotation / root[:, :, None], scales,
                   torch.cholesky_inverse(chol), logdet)

    def logdet(self) -> torch.Tensor:
        """``log det P`` per model, ``(P,)``."""
        return self.logdet_p

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """``P^{-1} x = (W ⊗ I) diag_k(H_k^{-1}) (W ⊗ I)ᵀ x_O``, for ``x`` zero at the missing pixels."""
        flat = x.flatten(3)
        per_channel = torch.einsum("ptk,prto->pkor", self.whitening, flat[..., self.index])
        solved = torch.einsum("ptk,pkor->prto", self.whitening, self.inverse @ per_channel)
        return torch.zeros_like(flat).index_copy_(-1, self.index, solved).reshape(x.shape)

    def schur_weights(self) -> torch.Tensor:
        """``M_j − Y_j = W diag_k(e_{jk} − h_{jk}) Wᵀ`` per eigenvector ``j``, ``(P, *grid, T, T)``.

        ``∂ log det P = Σ_j tr((M_j − (M_j − Y_j)) ∂Λ_j)``, the form the surrogate takes
        (:func:`~hyperspy_gp.gp.iterative.preconditioner_surrogate`), with ``M_j = (λ_j B +
        D)^{-1} = W diag_k(e_{jk}) Wᵀ``, ``e_{jk} = 1 / (λ_j γ_k + 1)``.
        """
        h = self.rows.quadratic_diagonal(self.inverse).flatten(2)  # (P, K, n)
        weights = self.scales - h
        blocks = torch.einsum("psk,pkj,ptk->pjst", self.whitening, weights, self.whitening)
        return blocks.reshape(*self.base.eigenvalues.shape, *blocks.shape[-2:])
