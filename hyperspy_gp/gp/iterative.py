r"""Iterative exact inference for any stationary kernel on a full grid (CG + SLQ).

The covariance ``Σ = B ⊗ K + D ⊗ I`` of the grid ICM model is applied by FFT
(:mod:`~hyperspy_gp.gp.toeplitz`), never formed.  Linear solves use preconditioned
conjugate gradients (CG); the preconditioner ``P`` is the same ICM model with the
*separable* kernel of the same length scales, which the Kronecker path of
:mod:`~hyperspy_gp.gp.likelihood` inverts and factorises exactly (``P = L Lᵀ`` with
``L = (Q ⊗ I_T) (⊕_j chol(λ_j B + D)) (Q ⊗ I_T)ᵀ``).  For the paper's non-separable Matérn
kernel ``P`` is close to ``Σ``, so CG needs tens of iterations whatever the grid size.

Log marginal likelihood.  With ``α = Σ^{-1} y``,

.. math::

    \log p(y) = -\tfrac12 yᵀα - \tfrac12 \log\det P
                - \tfrac12 \log\det(L^{-1} Σ L^{-T}) - \tfrac{nT}{2}\log 2π .

The last log-determinant is estimated by stochastic Lanczos quadrature (SLQ) with
``m`` Rademacher probes ``ε_i``: CG on ``Σ u_i = L ε_i`` is Lanczos on
``L^{-1} Σ L^{-T}`` started at ``ε_i``, and its coefficients give the tridiagonal
``T_i`` with ``\log\det ≈ \frac{nT}{m} Σ_i e_1ᵀ \log(T_i) e_1``.  Only this
correction to the exact ``\log\det P`` is estimated, so its error is small when
``P ≈ Σ``.  The probes are drawn once per model, so the objective is a deterministic
function of the hyperparameters, and a smooth one: ``L = Q C Qᵀ`` does not depend on
the signs ``eigh`` gives the eigenvectors (:meth:`KroneckerPreconditioner.factor_mul`).
``probes="exact"`` uses the ``nT`` unit vectors instead: the estimate is then exact up
to the CG tolerance (slow; for tests).

Gradient.  ``∂ log p = ½ αᵀ ∂Σ α − ½ tr(Σ^{-1} ∂Σ)`` with the trace estimated by
``(1/m) Σ_i u_iᵀ ∂Σ w_i``, ``w_i = L^{-T} ε_i`` (so that ``E[L ε εᵀ L^{-1}] = I``).
Both are bilinear forms in ``Σ``; with ``u``, ``w`` fixed, their derivatives in ``B``
and ``σ²`` are inner products and in the length scales a dot product of ``∂c/∂ℓ`` with
one FFT cross-correlation.  No eigendecomposition is differentiated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hyperspy_gp.gp.cholesky import safe_cholesky
from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.likelihood import icm_blocks
from hyperspy_gp.gp.tensor import blocks_dot, kron_dot, kron_outer, task_first
from hyperspy_gp.gp.toeplitz import ToeplitzKernel
from hyperspy_gp.memory import LOGDET_PROBES

#: Probes of the log-determinant estimate (see the module docstring; the memory estimate
#: of :mod:`hyperspy_gp.memory` assumes the same).
DEFAULT_PROBES = LOGDET_PROBES
#: Relative residual at which CG stops.
CG_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
#: Relative residual of the solves that feed a stochastic estimate: the likelihood and
#: its gradient (solved with the log-determinant probes) and the variance draws; the
#: posterior mean keeps :data:`CG_TOLERANCE`.  Measured against 1e-10 at fitted
#: hyperparameters, 64² × 6 maps: the likelihood unchanged to 1e-15 and its gradient to
#: 6e-8 relative (far below the probes' own error), with 29 % fewer iterations, both for
#: the Matérn kernel here (14 → 10) and for the Schur complement by CG with a masked
#: quarter disc (128 → 91).
ESTIMATE_CG_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-5}
#: CG iterations before :class:`CGConvergenceError`.
MAX_CG_ITERATIONS = 1000


class CGConvergenceError(RuntimeError):
    """Conjugate gradients did not reach their tolerance."""


def _maps_last(x: torch.Tensor) -> torch.Tensor:
    """``(P, R, T, *grid)`` → ``(P, R, *grid, T)``."""
    return x.movedim(2, -1)


def _maps_first(x: torch.Tensor) -> torch.Tensor:
    """``(P, R, *grid, T)`` → ``(P, R, T, *grid)``."""
    return x.movedim(-1, 2)


@dataclass
class KroneckerPreconditioner:
    """The separable-kernel ICM covariance ``P = L Lᵀ``, inverted and factorised exactly.

    Channel-first tensors ``(P, R, T, *grid)``.
    """

    eigenvectors: list[torch.Tensor]  # Q_a, (P, n_a, n_a)
    cholesky: torch.Tensor  # chol(λ_j B + D), (P, *grid, T, T)
    inverse: torch.Tensor  # (λ_j B + D)^{-1}, task-first (P, T, T, *grid) (tensor.task_first)
    jitter: torch.Tensor  # (P,)
    eigenvalues: torch.Tensor  # λ_j (corrected or not), (P, *grid)
    task_covariance: torch.Tensor  # B, (P, T, T)
    diagonal: torch.Tensor  # D plus the jitter, (P, T)

    @classmethod
    def build(cls, kernel: GridKernel, lengthscale, task_covariance, noise,
              toeplitz: ToeplitzKernel | None = None) -> KroneckerPreconditioner:
        """Factorise ``P`` in the eigenbasis of the separable kernel with ``lengthscale``.

        With ``toeplitz`` (the model's own kernel), the eigenvalues are corrected to
        ``λ̃_j = q_jᵀ K q_j``, the diagonal of the true ``K`` in that basis (the best
        diagonal approximation there).  Without the correction, the product and the
        radial Matérn kernels decay differently at high spatial frequencies, and with
        long length scales and low noise CG then needs hundreds of iterations.
        """
        separable = GridKernel(kernel.grid_shape, "separable", dtype=kernel.dtype, device=kernel.device)
        eigenvalues, eigenvectors = [], []
        for factor in separable.factors(lengthscale.detach()):
            lam, vec = torch.linalg.eigh(factor)
            eigenvalues.append(lam.clamp_min(0.0))
            eigenvectors.append(vec)
        if toeplitz is None:
            lam_grid = kron_outer(eigenvalues)
        else:
            lam_grid = corrected_eigenvalues(eigenvectors, toeplitz.values.detach())
        chol, jitter = safe_cholesky(icm_blocks(lam_grid, task_covariance.detach(), noise.detach()))
        return cls(eigenvectors, chol, task_first(torch.cholesky_inverse(chol)), jitter, lam_grid,
                   task_covariance.detach(), noise.detach() + jitter[:, None])

    @property
    def n_axes(self) -> int:
        return len(self.eigenvectors)

    def _rotate(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        matrices = [q.transpose(-1, -2) if transpose else q for q in self.eigenvectors]
        # Channel-first (P, R, T, *grid): the leading channel axes are left alone.
        return kron_dot(x, [None] * (x.dim() - 1 - self.n_axes) + matrices)

    def _blocks(self) -> torch.Tensor:
        return self.cholesky.unsqueeze(1)  # broadcast over probes

    def logdet(self) -> torch.Tensor:
        """``log det P`` per model, ``(P,)``."""
        diag = torch.diagonal(self.cholesky, dim1=-2, dim2=-1)
        return 2.0 * torch.log(diag).reshape(diag.shape[0], -1).sum(-1)

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """``P^{-1} x``."""
        rotated = self._rotate(x, transpose=True)
        # A product with the precomputed inverse blocks is faster than a batched
        # triangular solve (4× with 12 × 12 blocks), and blocks_dot than einsum's.
        solved = blocks_dot(self.inverse, rotated)
        return self._rotate(solved, transpose=False)

    def factor_mul(self, eps: torch.Tensor) -> torch.Tensor:
        """``L ε`` (a draw from ``N(0, P)`` when ``ε`` is white).

        ``L = Q C Qᵀ`` with ``C = ⊕_j chol(λ_j B + D)``, not the factor ``Q C``: the
        eigenvectors' signs (and bases of near-repeated eigenvalues) are whatever
        ``eigh`` returns and may flip between nearby hyperparameters, which would redraw
        the fixed probes ``L ε`` and make the objective jump.  ``Q C Qᵀ`` does not
        depend on that choice, so the probes move smoothly with the hyperparameters.
        """
        return self._in_eigenbasis(eps, lambda blocks: self._blocks() @ blocks)

    def factor_inv_t_mul(self, eps: torch.Tensor) -> torch.Tensor:
        """``L^{-T} ε = Q C^{-T} Qᵀ ε`` (see :meth:`factor_mul`)."""
        upper = self._blocks().transpose(-1, -2)
        return self._in_eigenbasis(eps, lambda blocks: torch.linalg.solve_triangular(upper, blocks, upper=True))

    def _in_eigenbasis(self, eps: torch.Tensor, per_block) -> torch.Tensor:
        """``(Q ⊗ I) per_block((Q ⊗ I)ᵀ ε)``, with ``per_block`` acting on the ``(P, R, *grid, T, 1)`` blocks."""
        blocks = per_block(_maps_last(self._rotate(eps, transpose=True)).unsqueeze(-1))
        return self._rotate(_maps_first(blocks.squeeze(-1)), transpose=False)

    def probe_weights(self, eps: torch.Tensor, drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``w = P^{-1} z`` of the probes ``z = L ε`` (``drawn``) and their weights ``‖ε‖²``, ``(P, R)``."""
        return self.factor_inv_t_mul(eps), eps.pow(2).sum(dim=tuple(range(2, eps.dim())))

    def surrogate(self, values, task_covariance, noise, whitened: torch.Tensor) -> torch.Tensor:
        """The control variate of the log-determinant's gradient (:func:`preconditioner_surrogate`)."""
        return preconditioner_surrogate(self, values, task_covariance, noise, whitened)


def corrected_eigenvalues(eigenvectors: list[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """``q_jᵀ K q_j`` for every Kronecker basis vector ``q_j = ⊗_a q_{a, j_a}``, ``(P, *grid)``.

    With ``R_a[j, δ]`` the autocorrelation of the 1-D eigenvector ``q_{a, j}`` at offset
    ``δ`` and ``c`` the kernel on the circulant offsets (``values``, ``(P, 2n_1, ...,
    2n_d)``, :attr:`ToeplitzKernel.values`), ``q_jᵀ K q_j = Σ_δ c(δ) Π_a R_a[j_a, δ_a]``:
    mode products of ``c`` with the ``R_a``, ``O(Σ_a n_a · n · 2^d)``, differentiable in
    ``values``.
    """
    autocorrelations = []
    for q in eigenvectors:
        size = 2 * q.shape[-2]
        spectrum = torch.fft.rfft(q.transpose(-1, -2), n=size, dim=-1)
        autocorrelations.append(torch.fft.irfft(spectrum.abs() ** 2, n=size, dim=-1))  # (P, n_a, 2n_a)
    return kron_dot(values, autocorrelations).clamp_min(0.0)


def preconditioner_surrogate(precond: KroneckerPreconditioner, values, task_covariance, noise,
                             whitened: torch.Tensor, schur_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``log det P(θ) − (1/m) Σ_i w_iᵀ P(θ) w_i`` with the eigenbasis held fixed, ``(P,)``.

    ``P(θ) = Q (λ̃(θ) ⊗ B + D) Qᵀ`` depends on the hyperparameters through ``B``,
    ``D`` and the corrected eigenvalues ``λ̃``; ``whitened`` holds ``w_i = P^{-1} z_i``
    (``L^{-T} ε_i``).  Its gradient is the exact ``∂ log det P`` minus the probes'
    estimate of it, the control variate that leaves only the small ``log det(P^{-1} Σ)``
    part to the probes.  With missing pixels, ``P`` is the observed block and
    ``schur_weights`` (:meth:`~hyperspy_gp.gp.iterative_missing.SchurPreconditioner.schur_weights`)
    adds the gradient of its Schur complement: the surrogate's value is then not
    ``log det P``, only its gradient is right.
    """
    lam = corrected_eigenvalues(precond.eigenvectors, values)
    blocks = icm_blocks(lam, task_covariance, noise + precond.jitter[:, None])
    chol = torch.linalg.cholesky(blocks)
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).reshape(chol.shape[0], -1).sum(-1)
    with torch.no_grad():
        rotated = precond._rotate(whitened, transpose=True)
        gram = torch.einsum("prs...,prt...->p...st", rotated, rotated) / whitened.shape[1]
        if schur_weights is not None:
            gram = gram + schur_weights
    form = (blocks * gram).reshape(blocks.shape[0], -1).sum(-1)
    return logdet - form


class ICMOperator:
    """``Σ x = K (x B) + x D`` on channel-first ``x`` ``(P, R, T, *grid)``, by FFT."""

    def __init__(self, toeplitz: ToeplitzKernel, task_covariance: torch.Tensor, noise: torch.Tensor) -> None:
        self.toeplitz = toeplitz
        self.task_covariance = task_covariance.detach()
        self.noise = noise.detach()
        self.n_axes = len(toeplitz.grid_shape)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """``x B``: map ``s`` becomes ``Σ_t B_st x_t``."""
        # One GEMM per vector (einsum's permuted copies cost 5× more: 128² × 6 maps).
        mixed = self.task_covariance.to(x.dtype).unsqueeze(1) @ x.reshape(*x.shape[:3], -1)
        return mixed.reshape(x.shape)

    def noise_view(self) -> torch.Tensor:
        return self.noise.reshape(*self.noise.shape[:1], 1, self.noise.shape[1], *([1] * self.n_axes))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.toeplitz.matmul(self.mix(x)) + self.noise_view() * x


@dataclass
class CGResult:
    """Solutions and the Lanczos coefficients of every column."""

    solution: torch.Tensor  # (P, R, T, *grid)
    alphas: torch.Tensor  # (I, *columns): columns (P, R), or (P, R, T) for one CG per map
    betas: torch.Tensor  # (I, *columns)
    iterations: torch.Tensor  # (*columns) iterations each column took


def preconditioned_cg(operator, preconditioner, rhs: torch.Tensor, tol: float, max_iter: int,
                      column_dims: int = 2, skip_converged: bool = False) -> CGResult:
    """Solve ``Σ x = rhs`` for every column of channel-first ``rhs`` at once.

    A column is one index of the first ``column_dims`` dimensions (``(p, r)`` by default,
    ``(p, r, k)`` for independent systems per map); the rest is its vector.  Columns stop
    updating once their relative residual is below ``tol``.  With ``skip_converged`` the
    operator and the preconditioner are called as ``operator(x, active)`` with the boolean
    ``active`` columns, and may return zeros for the others: when the columns are
    independent systems, the work goes to the unconverged ones only.

    Raises
    ------
    CGConvergenceError
        Some column did not converge in ``max_iter`` iterations.
    """
    spatial = tuple(range(column_dims, rhs.dim()))

    def dot(a, b):
        return (a * b).sum(dim=spatial)

    def per_column(v):
        return v.reshape(*v.shape, *([1] * len(spatial)))

    def precondition(r, active):
        return preconditioner(r, active) if skip_converged else preconditioner(r)

    x = torch.zeros_like(rhs)
    residual = rhs.clone()
    target = tol * dot(rhs, rhs).sqrt()
    active = dot(residual, residual).sqrt() > target
    z = precondition(residual, active)
    direction = z.clone()  # updated in place below; z may be the residual itself
    rz = dot(residual, z)
    iterations = torch.zeros_like(rz, dtype=torch.long)
    # Preallocated: small tensors allocated between the large temporaries of each
    # iteration would pin the heap and let the process's memory grow every iteration.
    coefficients = rz.new_zeros(2, max_iter, *rz.shape)
    n_done = 0
    for _ in range(max_iter):
        if not active.any():
            break
        ap = operator(direction, active) if skip_converged else operator(direction)
        alpha = torch.where(active, rz / torch.where(active, dot(direction, ap), torch.ones_like(rz)),
                            torch.zeros_like(rz))
        # In place: fewer large temporaries per iteration keep the process's memory flat.
        x.addcmul_(per_column(alpha), direction)
        residual.addcmul_(per_column(alpha), ap, value=-1.0)
        z = precondition(residual, active)
        rz_new = dot(residual, z)
        beta = torch.where(active, rz_new / torch.where(active, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        direction = direction.mul_(per_column(beta)).add_(z)
        rz = torch.where(active, rz_new, rz)
        coefficients[0, n_done], coefficients[1, n_done] = alpha, beta
        n_done += 1
        iterations = iterations + active.long()
        active = active & (dot(residual, residual).sqrt() > target)
    else:
        if active.any():
            raise CGConvergenceError(
                f"Conjugate gradients did not reach a relative residual of {tol:g} in {max_iter} iterations "
                f"(worst column at {float((dot(residual, residual).sqrt() / target).max() * tol):.2g}). The "
                "covariance is too ill-conditioned for the iterative solver: raise the lower bound of the noise "
                "or lower the upper length-scale bound."
            )
    return CGResult(x, coefficients[0, :n_done].clone(), coefficients[1, :n_done].clone(), iterations)


def active_maps(active: torch.Tensor | None) -> torch.Tensor | None:
    """Indices of the maps with an active column in a ``(P, R, T)`` mask of CG columns, ``None`` for all."""
    return None if active is None else torch.nonzero(active.any(dim=1).any(dim=0)).squeeze(-1)


def lanczos_logdet_quadrature(cg: CGResult, probe_norms: torch.Tensor) -> torch.Tensor:
    """``Σ_i ‖ε_i‖² e_1ᵀ log(T_i) e_1`` per model from the CG coefficients, ``(P,)``.

    ``cg`` holds probe columns only; ``probe_norms`` is ``‖ε_i‖²`` ``(P, R)``, or ``(P, R,
    T)`` for columns per map (a block-diagonal matrix: the sum over its blocks).
    """
    n_models = cg.iterations.shape[0]
    alphas, betas = cg.alphas.flatten(2).cpu(), cg.betas.flatten(2).cpu()
    iterations, probe_norms = cg.iterations.reshape(n_models, -1), probe_norms.reshape(n_models, -1)
    n_probes = iterations.shape[1]
    out = torch.zeros(n_models, dtype=alphas.dtype)
    for p in range(n_models):
        for r in range(n_probes):
            k = int(iterations[p, r])
            if k == 0:
                continue
            a, b = alphas[:k, p, r], betas[:k, p, r]
            diag = 1.0 / a
            diag[1:] += b[: k - 1] / a[: k - 1]
            off = b[: k - 1].sqrt() / a[: k - 1]
            tri = torch.diag(diag) + torch.diag(off, 1) + torch.diag(off, -1)
            theta, vectors = torch.linalg.eigh(tri)
            out[p] += probe_norms[p, r].cpu() * (vectors[0] ** 2 * torch.log(theta.clamp_min(1e-300))).sum()
    return out.to(cg.alphas.device)


def rademacher_probes(shape: tuple[int, ...], n_probes: int | str, seed: int, dtype, device) -> torch.Tensor:
    """Whitened probes ``ε``, channel-first ``(P, m, T, *grid)``.

    ``n_probes="exact"`` gives the ``nT`` unit vectors (exact trace, for tests).
    """
    n_models, n_tasks, *grid = shape
    if n_probes == "exact":
        size = n_tasks * math.prod(grid)
        # Scaled so that, like Rademacher probes, the mean of ε εᵀ over probes is I.
        eye = math.sqrt(size) * torch.eye(size, dtype=dtype, device=device).reshape(size, n_tasks, *grid)
        return eye.expand(n_models, *eye.shape).clone()
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n_models, int(n_probes), n_tasks, *grid), generator=generator)
    return (2.0 * signs - 1.0).to(dtype=dtype, device=device)


def iterative_log_likelihood(
    targets: torch.Tensor,
    task_covariance: torch.Tensor,
    noise: torch.Tensor,
    lengthscale: torch.Tensor,
    kernel: GridKernel,
    probes: torch.Tensor,
    observed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log marginal likelihood per model by CG and SLQ (see the module docstring).

    Parameters
    ----------
    targets
        ``(P, *grid, T)`` standardised maps; values at missing pixels are ignored.
    task_covariance, noise, lengthscale
        ``(P, T, T)``, ``(P, T)`` and ``(P, ndim)``; the result is differentiable in
        all three.
    kernel
        The (stationary) spatial kernel.
    probes
        ``(P, m, T, *grid)`` whitened probes, e.g. from :func:`rademacher_probes`.
    observed
        Boolean grid of the measured pixels, or ``None`` for a complete grid; the
        likelihood is then that of the observed values
        (:mod:`~hyperspy_gp.gp.iterative_missing`).

    Returns
    -------
    torch.Tensor
        ``(P,)``: the estimate, whose gradient is the stochastic gradient estimate.
    """
    n_axes = kernel.ndim
    y = targets.detach().movedim(-1, 1).unsqueeze(1)  # (P, 1, T, *grid)
    toeplitz = ToeplitzKernel(kernel, lengthscale)  # values keep the graph to ℓ
    with torch.no_grad():
        operator, precond = operator_and_preconditioner(kernel, toeplitz, lengthscale, task_covariance, noise,
                                                         observed)
        if observed is not None:
            y = y.masked_fill(~observed, 0.0)  # whatever the maps hold there, NaN included
        drawn = precond.factor_mul(probes)
        rhs = torch.cat([y, drawn], dim=1)
        tol = ESTIMATE_CG_TOLERANCE.get(y.dtype, 1e-5)
        cg = preconditioned_cg(operator, precond.solve, rhs, tol, MAX_CG_ITERATIONS)
        alpha, solved_probes = cg.solution[:, :1], cg.solution[:, 1:]
        n_probes = probes.shape[1]
        probe_cg = CGResult(solved_probes, cg.alphas[:, :, 1:], cg.betas[:, :, 1:], cg.iterations[:, 1:])
        whitened, norms = precond.probe_weights(probes, drawn)
        logdet = precond.logdet() + lanczos_logdet_quadrature(probe_cg, norms) / n_probes
        quad = (y * alpha).sum(dim=tuple(range(1, y.dim())))
        n_obs = y[0].numel() if observed is None else int(observed.sum()) * y.shape[2]
        value = -0.5 * (quad + logdet + n_obs * math.log(2.0 * math.pi))

        # Bilinear forms whose gradients are the gradient estimate.
        left = torch.cat([alpha, solved_probes], dim=1)
        right = torch.cat([alpha, whitened], dim=1)
        weights = torch.full((left.shape[1],), -0.5 / n_probes, dtype=y.dtype, device=y.device)
        weights[0] = 0.5
        weights = weights.reshape(1, -1, 1, *([1] * n_axes))
        f_right = toeplitz.transform(right)
        k_right = toeplitz.matmul_transformed(f_right)
        spatial = tuple(range(3, left.dim()))
        grad_b = torch.einsum("prs...,prt...->pst", weights * left, k_right)
        grad_noise = (weights * left * right).sum(dim=(1, *spatial))
        f_left = toeplitz.transform(weights * left)
        correlation = toeplitz.correlation(f_left, operator.mix(f_right))
    values = toeplitz.values
    surrogate = (
        (task_covariance * grad_b).sum(dim=(-2, -1))
        + (noise * grad_noise).sum(-1)
        + (values * correlation).reshape(values.shape[0], -1).sum(-1)
        - 0.5 * precond.surrogate(values, task_covariance, noise, whitened)
    )
    return value + surrogate - surrogate.detach()


def operator_and_preconditioner(kernel: GridKernel, toeplitz: ToeplitzKernel, lengthscale, task_covariance,
                                 noise, observed: torch.Tensor | None):
    """``Σ`` and its separable-kernel preconditioner, or ``Σ_OO`` and ``Σ̃_OO`` with missing pixels."""
    operator = ICMOperator(toeplitz, task_covariance, noise)
    precond = KroneckerPreconditioner.build(kernel, lengthscale, task_covariance, noise, toeplitz)
    if observed is None:
        return operator, precond
    from hyperspy_gp.gp.iterative_missing import ObservedOperator, observed_block_preconditioner

    observed = observed.to(lengthscale.device)
    return (ObservedOperator(toeplitz, task_covariance, noise, observed),
            observed_block_preconditioner(precond, observed))
