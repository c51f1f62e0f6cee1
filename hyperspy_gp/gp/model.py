"""Parameters of the grid ICM model: length scales, task covariance and noise.

A batch of ``P`` models is fitted at once: ``P = 1`` model with ``T`` tasks for the
*parallel* (multi-output) GP, ``P = T`` models with one task each for *independent*
GPs.  In GPyTorch vocabulary the parallel model is an ``ExactGP`` with a
``MultitaskKernel(MaternKernel(nu=2.5, ard_num_dims=2), num_tasks=T, rank=r)`` (an
``IndexKernel`` ``B = W Wᵀ + diag(v)`` on top of a shared spatial kernel) and a
``MultitaskGaussianLikelihood(rank=0, has_global_noise=False)`` (one noise per task).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import gpytorch
import numpy as np
import torch
from gpytorch.constraints import GreaterThan, Interval

from hyperspy_gp.gp.iterative import (
    DEFAULT_PROBES,
    iterative_log_likelihood,
    rademacher_probes,
)
from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.likelihood import grid_icm_log_likelihood

if TYPE_CHECKING:
    from hyperspy_gp.gp.coarse_space import CoarseLattice

#: Lower bound (pixels) of the length scale when the user gives none.  Below it,
#: neighbouring pixels are nearly uncorrelated (k(1 px) < 0.15) and a GP can no longer
#: tell signal from noise: fits that run there are degenerate, not informative.
MIN_LENGTHSCALE = 0.5
#: Floor of the noise variance, in units of the standardised map variance.
MIN_NOISE = 1e-6
#: Floor of the diagonal of ``B``.
MIN_TASK_VARIANCE = 1e-8
#: Default starting length scale (pixels), moved inside the bounds when needed.
DEFAULT_LENGTHSCALE_INIT = 3.0
#: Exact paths for missing pixels (see :class:`GridICMModel`).
MASKED_SOLVERS = ("dense", "schur", "schur-cg")


def lengthscale_constraint(bounds: tuple[float | None, float | None] | None):
    """GPyTorch constraint for ``lengthscale_bounds=(lo, hi)`` in pixels (hard)."""
    lo, hi = (None, None) if bounds is None else bounds
    lo = MIN_LENGTHSCALE if lo is None else float(lo)
    constraint = GreaterThan(lo) if hi is None else Interval(lo, float(hi))
    # GPyTorch rounds bounds to float32 (1.2 → 1.2000000477); keep them exact.
    constraint.lower_bound = torch.tensor(lo, dtype=torch.float64)
    if hi is not None:
        constraint.upper_bound = torch.tensor(float(hi), dtype=torch.float64)
    return constraint


def initial_lengthscale(bounds: tuple[float | None, float | None] | None) -> float:
    """A starting length scale strictly inside ``bounds``."""
    lo, hi = (None, None) if bounds is None else bounds
    lo = MIN_LENGTHSCALE if lo is None else float(lo)
    if hi is None:
        return max(DEFAULT_LENGTHSCALE_INIT, 2.0 * lo)
    return math.sqrt(lo * float(hi))


class GridICMModel(gpytorch.Module):
    """A batch of intrinsic-coregionalization GPs on one regular grid.

    Parameters
    ----------
    kernel
        The spatial kernel on the training grid.
    n_models
        Batch size ``P`` (independent models fitted together).
    n_tasks
        Maps per model ``T``.
    rank
        Rank of ``W`` in ``B = W Wᵀ + diag(v)``; 0 gives a diagonal ``B``, i.e. one
        output scale per map (used for independent GPs).
    isotropic
        Tie the length scales of all scan axes.
    lengthscale_bounds
        ``(lo, hi)`` in pixels of the training grid; either may be ``None``.
    observed
        Boolean grid (numpy order) of the pixels that were measured, or ``None`` for a
        complete grid (a mask with every pixel measured is taken as ``None``).  With it,
        the exact likelihood is computed by dense algebra on the observed pixels
        (:mod:`~hyperspy_gp.gp.dense`) or by the Kronecker eigenbasis with a Schur
        complement over the missing ones (:mod:`~hyperspy_gp.gp.schur`,
        :mod:`~hyperspy_gp.gp.schur_iterative`), see ``masked_solver``, or iteratively
        (``iterative``); without, by the Kronecker eigenbasis
        (:mod:`~hyperspy_gp.gp.likelihood`) or iteratively.
    masked_solver
        The exact path used when ``observed`` is given: ``"dense"``, ``"schur"`` (Schur
        complement factorised, a few missing pixels) or ``"schur-cg"`` (Schur complement
        by conjugate gradients with a stochastic log-determinant, many scattered ones,
        :mod:`~hyperspy_gp.gp.schur_iterative`); with ``iterative`` it is always
        ``"iterative"``.
    iterative
        Compute the likelihood by FFT products, conjugate gradients and a stochastic
        log-determinant (:mod:`~hyperspy_gp.gp.iterative`) instead of
        eigendecompositions: the path for the non-separable kernel on large grids.  With
        ``observed``, CG runs on the observed values
        (:mod:`~hyperspy_gp.gp.iterative_missing`, missing pixels up to its cost limit).
    n_probes
        Probes of the stochastic log-determinant estimates (``iterative`` and
        ``"schur-cg"``), or ``"exact"``.
    """

    def __init__(
        self,
        kernel: GridKernel,
        n_models: int,
        n_tasks: int,
        rank: int = 1,
        isotropic: bool = False,
        lengthscale_bounds=None,
        observed=None,
        masked_solver: str = "dense",
        iterative: bool = False,
        n_probes: int | str | None = None,
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.lengthscale_bounds = lengthscale_bounds
        self.n_models, self.n_tasks, self.rank = n_models, n_tasks, rank
        self.isotropic = isotropic or kernel.ndim == 1
        n_ls = 1 if self.isotropic else kernel.ndim
        opts = {"dtype": kernel.dtype, "device": kernel.device}

        self.register_parameter("raw_lengthscale", torch.nn.Parameter(torch.zeros(n_models, n_ls, **opts)))
        self.register_constraint("raw_lengthscale", lengthscale_constraint(lengthscale_bounds))
        self.register_parameter("raw_task_variance", torch.nn.Parameter(torch.zeros(n_models, n_tasks, **opts)))
        self.register_constraint("raw_task_variance", GreaterThan(MIN_TASK_VARIANCE))
        self.register_parameter("raw_noise", torch.nn.Parameter(torch.zeros(n_models, n_tasks, **opts)))
        self.register_constraint("raw_noise", GreaterThan(MIN_NOISE))
        if rank > 0:
            self.register_parameter("task_factor", torch.nn.Parameter(torch.zeros(n_models, n_tasks, rank, **opts)))
        self.to(**opts)  # constraint bounds follow the model's dtype and device
        self.observed = None if observed is None else np.asarray(observed, dtype=bool)
        if self.observed is not None and self.observed.shape != kernel.grid_shape:
            raise ValueError(f"observed mask shape {self.observed.shape} != grid {kernel.grid_shape}")
        if self.observed is not None and self.observed.all():
            self.observed = None  # nothing missing: the complete grid's paths
        self.iterative = bool(iterative)
        valid = (*MASKED_SOLVERS, "iterative") if self.iterative else MASKED_SOLVERS
        if masked_solver not in valid:
            raise ValueError(f"masked_solver must be one of {valid}, not {masked_solver!r}.")
        self.masked_solver = "iterative" if self.iterative else masked_solver  # FFT products serve missing pixels
        self.n_probes = DEFAULT_PROBES if n_probes is None else n_probes
        if self.observed is not None:
            from hyperspy_gp.gp.dense import observed_index_from_mask

            self.observed_index = observed_index_from_mask(self.observed, kernel.factor_shape).to(kernel.device)
            self.missing_index = observed_index_from_mask(~self.observed, kernel.factor_shape).to(kernel.device)
        self.reset_parameters(initial_lengthscale(lengthscale_bounds))

    def reset_parameters(self, lengthscale: float) -> None:
        """Deterministic start: ``ℓ`` given, ``B_tt ≈ 0.9``, noise 0.1 (standardised maps)."""
        with torch.no_grad():
            self._set("raw_lengthscale", torch.full_like(self.raw_lengthscale, lengthscale))
            shared = 0.45 if self.rank > 0 else 0.0
            self._set("raw_task_variance", torch.full_like(self.raw_task_variance, 0.9 - shared))
            self._set("raw_noise", torch.full_like(self.raw_noise, 0.1))
            if self.rank > 0:
                t = torch.arange(self.n_tasks, dtype=self.kernel.dtype, device=self.kernel.device)
                k = torch.arange(self.rank, dtype=self.kernel.dtype, device=self.kernel.device)
                # First column shares structure; the others break the symmetry.
                w = torch.cos(math.pi * (t[:, None] + 0.5) * k[None, :] / self.n_tasks)
                w[:, 1:] *= 0.1
                self.task_factor.copy_(math.sqrt(shared) * w.expand_as(self.task_factor))

    def _set(self, name: str, value: torch.Tensor) -> None:
        constraint = self._constraints[f"{name}_constraint"]
        getattr(self, name).copy_(constraint.inverse_transform(value))

    def _get(self, name: str) -> torch.Tensor:
        return self._constraints[f"{name}_constraint"].transform(getattr(self, name))

    @property
    def lengthscale(self) -> torch.Tensor:
        """Length scales in pixels, ``(P, ndim)`` in numpy axis order."""
        return self._get("raw_lengthscale").expand(self.n_models, self.kernel.ndim)

    @property
    def noise(self) -> torch.Tensor:
        """Noise variances ``σ²``, ``(P, T)``."""
        return self._get("raw_noise")

    @property
    def task_covariance(self) -> torch.Tensor:
        """``B = W Wᵀ + diag(v)``, ``(P, T, T)``."""
        b = torch.diag_embed(self._get("raw_task_variance"))
        if self.rank > 0:
            b = b + self.task_factor @ self.task_factor.transpose(-1, -2)
        return b

    @property
    def stochastic_objective(self) -> bool:
        """Whether :meth:`log_likelihood` is a stochastic estimate (probes, not ``"exact"``).

        True on the iterative path and for ``masked_solver="schur-cg"`` with missing
        pixels; the optimiser's tolerance is then loosened to the estimate's precision.
        """
        uses_probes = self.iterative or (self.observed is not None and self.masked_solver == "schur-cg")
        return uses_probes and self.n_probes != "exact"

    def as_factor_layout(self, targets: torch.Tensor) -> torch.Tensor:
        """Reshape ``(P, *grid, T)`` targets to the kernel's factor layout."""
        return targets.reshape(targets.shape[0], *self.kernel.factor_shape, targets.shape[-1])

    def observed_values(self, targets: torch.Tensor) -> torch.Tensor:
        """``(P, |O|, T)`` values of ``(P, *grid, T)`` targets at the observed pixels."""
        flat = targets.reshape(targets.shape[0], -1, targets.shape[-1])
        mask = torch.as_tensor(self.observed.reshape(-1), device=targets.device)
        return flat[:, mask]

    def schur_probes(self, targets: torch.Tensor) -> torch.Tensor:
        """Fixed probes ``(P, R, T, m)`` over the missing values for ``masked_solver="schur-cg"``."""
        shape = (targets.shape[0], self.n_tasks, self.missing_index.shape[0])
        return rademacher_probes(shape, self.n_probes, 0, self.kernel.dtype, targets.device)

    @functools.cached_property
    def coarse_lattice(self) -> CoarseLattice | None:
        """Coarse points of the Schur complement by CG, or ``None``.

        Missing pixels deep inside large masked regions, for the preconditioner's
        coarse-space correction (:class:`~hyperspy_gp.gp.coarse_space.CoarseLattice`, a
        lattice per number of whitened maps that need it); ``None`` unless
        ``masked_solver="schur-cg"`` and the mask has such regions.
        """
        if self.observed is None or self.masked_solver != "schur-cg":
            return None
        from hyperspy_gp.gp.coarse_space import CoarseLattice

        lattice = CoarseLattice(self.observed, self.n_models, self.missing_index)
        return lattice if lattice.points(1) is not None else None

    def log_likelihood(self, targets: torch.Tensor) -> torch.Tensor:
        """Exact log marginal likelihood of each model, ``(P,)``."""
        if self.iterative:
            shape = (targets.shape[0], self.n_tasks, *self.kernel.grid_shape)
            probes = rademacher_probes(shape, self.n_probes, 0, self.kernel.dtype, targets.device)
            observed = None if self.observed is None else torch.as_tensor(self.observed, device=targets.device)
            return iterative_log_likelihood(
                targets, self.task_covariance, self.noise, self.lengthscale, self.kernel, probes, observed
            )
        if self.observed is not None and self.masked_solver == "dense":
            from hyperspy_gp.gp.dense import masked_log_likelihood, observed_kernel_of

            k_oo = observed_kernel_of(self.kernel, self.lengthscale, self.observed_index)
            return masked_log_likelihood(self.observed_values(targets), self.task_covariance, self.noise, k_oo)
        covariances = (self.task_covariance, self.noise, self.kernel.factors(self.lengthscale))
        if self.observed is None:
            return grid_icm_log_likelihood(self.as_factor_layout(targets), *covariances)
        if self.masked_solver == "schur":
            from hyperspy_gp.gp.schur import schur_log_likelihood

            return schur_log_likelihood(self.as_factor_layout(targets), *covariances, self.missing_index)
        from hyperspy_gp.gp.schur_iterative import schur_cg_log_likelihood

        return schur_cg_log_likelihood(self.as_factor_layout(targets), *covariances, self.missing_index,
                                       self.schur_probes(targets), self.coarse_lattice)

    def submodel(self, index: int) -> GridICMModel:
        """A batch of one: a copy of model ``index`` (its parameters, not shared)."""
        sub = GridICMModel(self.kernel, 1, self.n_tasks, rank=self.rank, isotropic=self.isotropic,
                           lengthscale_bounds=self.lengthscale_bounds, observed=self.observed,
                           masked_solver=self.masked_solver, iterative=self.iterative, n_probes=self.n_probes)
        with torch.no_grad():
            for name, param in sub.named_parameters():
                param.copy_(getattr(self, name)[index : index + 1])
        return sub

    def load_submodel(self, index: int, sub: GridICMModel) -> None:
        """Copy the parameters of a batch-of-one ``sub`` into model ``index``."""
        with torch.no_grad():
            for name, param in sub.named_parameters():
                getattr(self, name)[index : index + 1] = param

    def state(self) -> dict[str, torch.Tensor]:
        """Detached copies of the constrained hyperparameters."""
        with torch.no_grad():
            return {
                "lengthscale": self.lengthscale.clone(),
                "noise": self.noise.clone(),
                "task_covariance": self.task_covariance.clone(),
            }
