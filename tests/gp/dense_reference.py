"""Dense O((nT)³) reference implementations used to check the structured engine."""

from __future__ import annotations

import math

import torch


def grid_points(shape, upsampling=1, dtype=torch.float64):
    axes = [torch.arange(n * upsampling, dtype=dtype) / upsampling for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=-1)


def matern52(r):
    s = math.sqrt(5.0) * r
    return (1 + s + s * s / 3) * torch.exp(-s)


def kernel_matrix(x1, x2, lengthscale, kind):
    diff = (x1[:, None, :] - x2[None, :, :]) / lengthscale
    if kind == "separable":
        return torch.prod(matern52(diff.abs()), dim=-1)
    return matern52(torch.sqrt(diff.pow(2).sum(-1).clamp_min(1e-300)))


def dense_icm(targets, lengthscale, task_covariance, noise, kind, upsampling=1, observed=None):
    """Exact log likelihood, latent predictive mean and variance by dense algebra.

    ``targets`` is ``(*grid, T)`` for one model; ``observed`` an optional boolean grid
    of the pixels used for training.  Returns ``(mll, mean, variance)`` with
    mean/variance shaped ``(*upsampled_grid, T)``.
    """
    shape, n_tasks = targets.shape[:-1], targets.shape[-1]
    keep = torch.ones(math.prod(shape), dtype=torch.bool) if observed is None else torch.as_tensor(observed).reshape(-1)
    x = grid_points(shape)[keep]
    xs = grid_points(shape, upsampling)
    k = kernel_matrix(x, x, lengthscale, kind)
    sigma = torch.kron(task_covariance, k) + torch.kron(torch.diag(noise), torch.eye(len(x), dtype=k.dtype))
    y = targets.reshape(-1, n_tasks)[keep].T.reshape(-1)  # task-major
    chol = torch.linalg.cholesky(sigma)
    alpha = torch.cholesky_solve(y[:, None], chol)[:, 0]
    mll = -0.5 * (y @ alpha + 2 * torch.log(torch.diagonal(chol)).sum() + y.numel() * math.log(2 * math.pi))
    cross = torch.kron(task_covariance, kernel_matrix(xs, x, lengthscale, kind))
    mean = (cross @ alpha).reshape(n_tasks, -1).T
    reduction = torch.einsum("ij,ji->i", cross, torch.cholesky_solve(cross.T, chol)).reshape(n_tasks, -1).T
    variance = torch.diagonal(task_covariance)[None, :] - reduction
    out_shape = tuple(n * upsampling for n in shape) + (n_tasks,)
    return mll, mean.reshape(out_shape), variance.reshape(out_shape)
