"""Missing pixels on the iterative path (CG on the observed values) against dense references.

As for the complete grid (:mod:`tests.gp.test_iterative`): with ``n_probes="exact"``
the likelihood and its gradient equal the dense likelihood of the observed values to
1e-6; with the default probes they stay within the stated tolerances; the mean is
exact and the Monte-Carlo variance agrees within its reported standard error.
"""

import math

import numpy as np
import pytest
import torch

from hyperspy_gp.gp.iterative import KroneckerPreconditioner, corrected_eigenvalues
from hyperspy_gp.gp.iterative_missing import ObservedBlockPreconditioner, SchurPreconditioner, max_missing_pixels
from hyperspy_gp.gp.iterative_prediction import IterativePosterior
from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.model import GridICMModel
from hyperspy_gp.gp.toeplitz import ToeplitzKernel
from hyperspy_gp.gp.training import fit_model
from tests.gp.dense_reference import dense_icm
from tests.gp.test_iterative import (
    GRADIENT_RTOL_PROBES,
    MLL_RTOL_PROBES,
    RTOL,
    _flat,
    _rel,
    assert_exact_mean_and_calibrated_variance,
    likelihood_against_reference,
)


def _observed(shape, n_missing, seed=0):
    """Scattered missing pixels plus, on 2-D grids, a 2 × 2 block of them."""
    observed = np.ones(shape, dtype=bool)
    rng = np.random.default_rng(seed)
    observed.reshape(-1)[rng.choice(observed.size, n_missing, replace=False)] = False
    if len(shape) == 2:
        observed[2:4, 3:5] = False
    return observed


def _random_model(kind, shape, n_models, n_tasks, rank, n_missing=4, seed=0, **options):
    gen = torch.Generator().manual_seed(seed)
    observed = _observed(shape, n_missing, seed)
    model = GridICMModel(GridKernel(shape, kind), n_models, n_tasks, rank=rank, iterative=True, observed=observed,
                         **options)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.4 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    targets = torch.randn(n_models, *shape, n_tasks, generator=gen, dtype=torch.float64)
    targets[:, ~torch.as_tensor(observed)] = float("nan")  # ignored: the likelihood must not see them
    return model, targets


def _reference_likelihood(model, targets):
    return _dense_reference(model, targets)[0]


def _dense_reference(model, targets, upsampling=1):
    observed = torch.as_tensor(model.observed)
    results = [dense_icm(torch.nan_to_num(targets[p]), model.lengthscale[p], model.task_covariance[p], model.noise[p],
                         model.kernel.kind, upsampling=upsampling, observed=observed)
               for p in range(model.n_models)]
    return [torch.stack(r) for r in zip(*results)]


# kind, grid, models, maps, rank of W, missing pixels (besides the 2 × 2 block on 2-D grids)
CASES = [("matern", (8, 9), 1, 3, 1, 4), ("matern", (9, 8), 3, 1, 0, 4), ("separable", (7, 8), 1, 2, 1, 4),
         ("matern", (16,), 1, 2, 1, 4), ("matern", (10, 12), 1, 3, 1, 40),
         # sparse scans: the preconditioner built from the observed pixels
         ("matern", (10, 12), 1, 3, 1, 90), ("matern", (9, 8), 3, 1, 0, 50), ("matern", (20,), 1, 2, 1, 14)]


@pytest.mark.parametrize("kind,shape,n_models,n_tasks,rank,n_missing", CASES)
def test_exact_probes_give_the_dense_likelihood_and_gradient_of_the_observed_values(kind, shape, n_models, n_tasks,
                                                                                      rank, n_missing):
    model, targets = _random_model(kind, shape, n_models, n_tasks, rank, n_missing, n_probes="exact")
    value, grads, reference, ref_grads = likelihood_against_reference(model, targets, _reference_likelihood)
    assert torch.isfinite(value).all()  # the NaN at the missing pixels are not seen
    assert _rel(value, reference) < RTOL
    for name in grads:
        assert _rel(grads[name], ref_grads[name]) < RTOL, name


@pytest.mark.parametrize("n_missing", [10, 80])
def test_default_probes_stay_within_the_stated_tolerance(n_missing):
    model, targets = _random_model("matern", (16, 16), 1, 3, 1, n_missing=n_missing)
    value, grads, reference, ref_grads = likelihood_against_reference(model, targets, _reference_likelihood)
    assert _rel(value, reference) < MLL_RTOL_PROBES
    assert _rel(_flat(grads), _flat(ref_grads)) < GRADIENT_RTOL_PROBES


def _preconditioner(tasks="general", side=SchurPreconditioner, shape=(6, 7), n_tasks=3):
    kernel = GridKernel(shape, "matern")
    lengthscale = torch.tensor([[2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    if tasks == "general":
        w = torch.randn(1, n_tasks, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        b = (w @ w.mT + 0.2 * torch.eye(n_tasks, dtype=torch.float64)).requires_grad_()
        noise = torch.tensor([[0.1, 0.3, 0.05][:n_tasks]], dtype=torch.float64, requires_grad=True)
    else:  # identical maps: B of rank one, the whitened B's eigenvalue 0 repeated
        b = torch.full((1, n_tasks, n_tasks), 2.0, dtype=torch.float64, requires_grad=True)
        noise = torch.full((1, n_tasks), 0.1, dtype=torch.float64, requires_grad=True)
    toeplitz = ToeplitzKernel(kernel, lengthscale)
    base = KroneckerPreconditioner.build(kernel, lengthscale, b, noise, toeplitz)
    observed = torch.as_tensor(_observed(shape, 3))
    return side.build(base, observed), (lengthscale, b, noise, toeplitz), observed


def _dense_covariance(precond, task_covariance, noise, eigenvalues):
    """``Σ̃ = Q (λ̃ ⊗ B + D) Qᵀ`` densely, task-major ``(T n, T n)``."""
    q = precond.base.eigenvectors
    basis = torch.kron(q[0][0], q[1][0]).contiguous()  # (n, n), columns the eigenvectors
    blocks = eigenvalues.reshape(-1)[:, None, None] * task_covariance[0] + torch.diag(noise[0])
    blocks = blocks + precond.base.jitter[0] * torch.eye(blocks.shape[-1], dtype=blocks.dtype)
    n, t = basis.shape[0], blocks.shape[-1]
    spectral = torch.zeros(t * n, t * n, dtype=blocks.dtype)
    index = torch.arange(n)
    for s in range(t):
        for u in range(t):
            spectral[s * n + index, u * n + index] = blocks[:, s, u]
    rotation = torch.kron(torch.eye(t, dtype=basis.dtype), basis)
    return rotation @ spectral @ rotation.T


@pytest.mark.parametrize("tasks", ["general", "identical maps"])
@pytest.mark.parametrize("side", [SchurPreconditioner, ObservedBlockPreconditioner])
def test_preconditioner_is_the_observed_block_of_the_separable_covariance(tasks, side):
    precond, (_, b, noise, toeplitz), observed = _preconditioner(tasks, side)
    with torch.no_grad():
        eigenvalues = corrected_eigenvalues(precond.base.eigenvectors, toeplitz.values)
        dense = _dense_covariance(precond, b, noise, eigenvalues)
    keep = observed.reshape(-1).repeat(b.shape[-1])  # task-major
    dense_oo = dense[keep][:, keep]
    shape, t = observed.shape, b.shape[-1]
    x = torch.randn(1, 4, t, *shape, dtype=torch.float64) * observed
    solved = precond.solve(x)
    assert float(solved[..., ~observed].abs().max()) == 0.0  # stays on the observed pixels
    expected = torch.linalg.solve(dense_oo, x.reshape(4, -1)[:, keep].T).T
    assert torch.allclose(solved.reshape(4, -1)[:, keep], expected, rtol=1e-9, atol=1e-9)
    assert float(precond.logdet()[0]) == pytest.approx(float(torch.logdet(dense_oo)), rel=1e-10)
    # Probes: full-grid draws of N(0, Σ̃) restricted to the observed pixels, whose
    # covariance over the exact unit vectors is Σ̃_OO itself.
    size = t * math.prod(shape)
    eye = torch.eye(size, dtype=torch.float64).reshape(1, size, t, *shape)
    drawn = precond.factor_mul(eye).reshape(size, -1)[:, keep]
    assert torch.allclose(drawn.T @ drawn, dense_oo, atol=1e-10)


@pytest.mark.parametrize("tasks", ["general", "identical maps"])
@pytest.mark.parametrize("side", [SchurPreconditioner, ObservedBlockPreconditioner])
def test_control_variate_has_the_exact_gradient_of_the_log_determinant(tasks, side):
    # With no probes (w = 0) the surrogate's gradient is ∂ log det Σ̃_OO(θ) with the
    # eigenbasis held fixed: here against autograd through the dense matrix.
    precond, (lengthscale, b, noise, toeplitz), observed = _preconditioner(tasks, side)
    whitened = torch.zeros(1, 1, b.shape[-1], *observed.shape, dtype=torch.float64)
    surrogate = precond.surrogate(toeplitz.values, b, noise, whitened).sum()
    grads = torch.autograd.grad(surrogate, (lengthscale, b, noise))
    toeplitz_again = ToeplitzKernel(GridKernel(observed.shape, "matern"), lengthscale)
    eigenvalues = corrected_eigenvalues(precond.base.eigenvectors, toeplitz_again.values)
    keep = observed.reshape(-1).repeat(b.shape[-1])
    dense_oo = _dense_covariance(precond, b, noise, eigenvalues)[keep][:, keep]
    expected = torch.autograd.grad(torch.logdet(dense_oo), (lengthscale, b, noise))
    for got, want in zip(grads, expected):
        assert _rel(got, want) < 1e-8


@pytest.mark.parametrize("shape,upsampling,masked_twin,n_missing", [
    ((12, 10), 2, True, 5), ((15,), 3, True, 5), ((12, 10), 2, False, 5),
    ((12, 10), 2, True, 90)])  # a sparse scan
def test_posterior_mean_is_exact_and_variance_within_its_standard_error(shape, upsampling, masked_twin, n_missing,
                                                                         monkeypatch):
    if not masked_twin:  # the separable twin's Schur columns do not fit: the complete grid's twin
        monkeypatch.setattr("hyperspy_gp.memory.MAX_SCHUR_ENTRIES", 0)
    model, targets = _random_model("matern", shape, 1, 2, 1, n_missing=n_missing, seed=3)
    _, mean_ref, var_ref = _dense_reference(model, targets, upsampling)
    assert_exact_mean_and_calibrated_variance(IterativePosterior(model, targets, n_samples=64), upsampling,
                                              mean_ref.detach(), var_ref.detach())


def test_fit_agrees_with_the_dense_fit_of_the_observed_values():
    yy, xx = np.mgrid[:20, :20]
    rng = np.random.default_rng(1)
    truth = np.sin(xx / 2.0) * np.cos(yy / 3.0)
    maps = np.stack([truth + 0.2 * rng.normal(size=truth.shape), truth + 0.6 * rng.normal(size=truth.shape)], -1)
    observed = _observed((20, 20), 12, seed=2)
    standardised = (maps - maps[observed].mean(0)) / maps[observed].std(0)
    targets = torch.tensor(np.where(observed[..., None], standardised, 0.0)[None])
    kernel = GridKernel((20, 20), "matern")
    models = [GridICMModel(kernel, 1, 2, rank=1, observed=observed, masked_solver="dense"),
              GridICMModel(kernel, 1, 2, rank=1, observed=observed, iterative=True)]
    for model in models:
        assert fit_model(model, targets).converged
    reference_state = {k: v.clone() for k, v in models[0].state_dict().items()}
    dense, iterative = (m.state() for m in models)
    assert torch.allclose(iterative["lengthscale"], dense["lengthscale"], rtol=0.05)
    assert torch.allclose(iterative["noise"], dense["noise"], rtol=0.02)
    # B trades off against the length scale along a flat ridge: judged by the exact
    # likelihood, the iterative optimum is as good as the dense one.
    models[0].load_state_dict(models[1].state_dict())
    with torch.no_grad():
        at_iterative = float(models[0].log_likelihood(targets)[0])
        models[0].load_state_dict(reference_state)
        best = float(models[0].log_likelihood(targets)[0])
    assert best - 0.1 < at_iterative <= best + 1e-6


def test_the_path_serves_as_many_missing_pixels_as_its_cost_allows():
    from hyperspy_gp.gp.iterative_missing import MAX_MISSING_COST, block_cost, missing_pixel_cost, pixel_lines

    shape = (256, 256)
    limit = max_missing_pixels(shape, 12)
    assert block_cost(shape, limit, 12) <= MAX_MISSING_COST < block_cost(shape, limit + 1, 12)
    # Fewer with more maps per GP, and with more independent GPs to serve.
    assert max_missing_pixels(shape, 1) > max_missing_pixels(shape, 6) > limit > 0
    assert max_missing_pixels(shape, 1, n_models=6) < max_missing_pixels(shape, 1)
    # Pixels on few lines cost less than as many scattered at random: a 40 × 40 block.
    observed = np.ones(shape, dtype=bool)
    observed[100:140, 30:70] = False
    assert pixel_lines(~observed) == (40, 40)
    assert missing_pixel_cost(observed, 12) < block_cost(shape, 1600, 12) / 2
    # A sparse scan costs what its few measured pixels cost, built from their side.
    sparse = ~_observed(shape, 2000)
    assert missing_pixel_cost(sparse, 12) == block_cost(shape, 2004, 12, *pixel_lines(sparse), side="observed")
    assert missing_pixel_cost(sparse, 12) <= MAX_MISSING_COST


@pytest.mark.parametrize("n_missing,side", [(10, SchurPreconditioner), (100, ObservedBlockPreconditioner)])
def test_the_preconditioner_is_built_from_the_cheaper_side_of_the_mask(n_missing, side):
    from hyperspy_gp.gp.iterative_missing import observed_block_preconditioner

    kernel = GridKernel((11, 12), "matern")
    lengthscale = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    b, noise = torch.eye(2, dtype=torch.float64)[None], torch.tensor([[0.1, 0.2]], dtype=torch.float64)
    base = KroneckerPreconditioner.build(kernel, lengthscale, b, noise, ToeplitzKernel(kernel, lengthscale))
    assert isinstance(observed_block_preconditioner(base, torch.as_tensor(_observed((11, 12), n_missing))), side)
