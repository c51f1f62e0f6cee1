"""The structured engine equals dense exact GP algebra (and GPyTorch) to 1e-6 relative."""

import math

import numpy as np
import pytest
import torch

from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.model import GridICMModel
from hyperspy_gp.gp.prediction import GridPosterior, make_posterior

from .dense_reference import dense_icm, grid_points

RTOL = 1e-6

CASES = [
    ("separable", (7, 9)),
    ("separable", (16, 16)),
    ("matern", (6, 8)),
    ("matern", (12, 12)),
    ("separable", (15,)),
]


def _random_model(kind, shape, n_tasks, rank, seed, equal_lengthscales=False):
    gen = torch.Generator().manual_seed(seed)
    model = GridICMModel(GridKernel(shape, kind), 1, n_tasks, rank=rank)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        if equal_lengthscales:
            model.raw_lengthscale.fill_(model.raw_lengthscale[0, 0].item())
    targets = torch.randn(1, *shape, n_tasks, generator=gen, dtype=torch.float64)
    return model, targets


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind,shape", CASES)
@pytest.mark.parametrize("n_tasks,rank", [(1, 0), (3, 1), (4, 2)])
def test_mll_mean_variance_equal_dense_reference(kind, shape, n_tasks, rank):
    model, targets = _random_model(kind, shape, n_tasks, rank, seed=len(shape) + n_tasks)
    state = model.state()
    ref_mll, ref_mean, ref_var = dense_icm(
        targets[0], state["lengthscale"][0], state["task_covariance"][0], state["noise"][0], kind, upsampling=2
    )
    with torch.no_grad():
        mll = model.log_likelihood(targets)[0]
    coords = [model.kernel.axis_coordinates(n, 2) for n in shape]
    mean, var = GridPosterior(model, targets).predict(coords)
    assert _rel(mll, ref_mll) < RTOL
    assert _rel(mean[0], ref_mean) < RTOL
    assert _rel(var[0], ref_var) < RTOL


@pytest.mark.parametrize("masked", [False, True], ids=["complete", "missing pixels"])
def test_the_variance_keeps_its_digits_with_a_nearly_rank_one_task_covariance(masked):
    # Two smooth maps that move together with very little noise: B = f fᵀ + diag(v) with
    # B/σ² = 10⁸ and cond(B) = 2.5·10⁶, so the variance is 10⁻⁸ of the prior.  Forming
    # B M_j B from the inverse T × T blocks lost cond(S_j) digits (1.2e-3 relative error
    # at every pixel, the Schur path's too); from the whitened tasks, 3.5e-7.
    shape = (12, 10)
    observed = None
    if masked:
        observed = np.ones(shape, dtype=bool)
        observed[3, 4] = observed[7, 2] = False
        observed[5:7, 6:8] = False
    model = GridICMModel(GridKernel(shape, "separable"), 1, 2, rank=1, observed=observed, masked_solver="schur")
    with torch.no_grad():
        model._set("raw_lengthscale", torch.full_like(model.raw_lengthscale, 3.0))
        model.task_factor.copy_(torch.tensor([[[1000.0], [1000.0 / 3]]], dtype=torch.float64))
        model._set("raw_noise", torch.full_like(model.raw_noise, 1e-2))
    state = model.state()
    assert float(state["task_covariance"][0].diagonal().max() / state["noise"].min()) == pytest.approx(1e8, rel=1e-3)
    targets = torch.randn(1, *shape, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, _, ref_var = dense_icm(targets[0], state["lengthscale"][0], state["task_covariance"][0], state["noise"][0],
                              "separable", upsampling=2, observed=observed)
    _, var = make_posterior(model, targets).predict([model.kernel.axis_coordinates(n, 2) for n in shape])
    assert float(((var[0] - ref_var).abs() / ref_var).max()) < 1e-5


@pytest.mark.parametrize("kind,shape", [("separable", (8, 8)), ("matern", (6, 6)), ("separable", (10,))])
def test_gradient_equals_dense_autograd_even_with_repeated_eigenvalues(kind, shape):
    # Square grid + equal length scales: every eigenvalue of K_y ⊗ K_x is repeated,
    # where autograd through eigh gives NaN.  Identical maps and a rank-deficient B.
    model, targets = _random_model(kind, shape, 3, 1, seed=3, equal_lengthscales=True)
    targets = targets[..., :1].expand(*targets.shape[:-1], 3).contiguous()
    with torch.no_grad():
        model.raw_task_variance.fill_(-20.0)  # v at its floor: B ≈ W Wᵀ, rank 1
    model.log_likelihood(targets).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None

    s = model.state()
    ls = model.lengthscale[0]
    b = model.task_covariance[0]
    noise = model.noise[0]
    ref, _, _ = dense_icm(targets[0], ls, b, noise, kind)
    ref.backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(ours[name]).all(), name
        assert _rel(ours[name], p.grad) < RTOL, name
    assert torch.isfinite(torch.as_tensor(s["lengthscale"])).all()


def test_equals_gpytorch_multitask_exact_gp():
    """Our parallel model is GPyTorch's multitask ExactGP recipe, computed exactly."""
    gpytorch = pytest.importorskip("gpytorch")
    shape, n_tasks, rank = (8, 10), 3, 1
    model, targets = _random_model("matern", shape, n_tasks, rank, seed=11)
    x = grid_points(shape)
    y = targets[0].reshape(-1, n_tasks)
    s = model.state()

    class MultitaskGP(gpytorch.models.ExactGP):
        def __init__(self, likelihood):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ZeroMean(), num_tasks=n_tasks)
            self.covar_module = gpytorch.kernels.MultitaskKernel(
                gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=2), num_tasks=n_tasks, rank=rank
            )

        def forward(self, inputs):
            return gpytorch.distributions.MultitaskMultivariateNormal(
                self.mean_module(inputs), self.covar_module(inputs)
            )

    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(
        num_tasks=n_tasks, rank=0, has_global_noise=False,
        noise_constraint=gpytorch.constraints.GreaterThan(1e-8),
    ).double()
    gp = MultitaskGP(likelihood).double()
    gp.covar_module.data_covar_module.lengthscale = s["lengthscale"][0]
    gp.covar_module.task_covar_module.covar_factor.data = model.task_factor.detach()[0].clone()
    gp.covar_module.task_covar_module.var = torch.diagonal(s["task_covariance"][0]) - (
        model.task_factor.detach()[0] ** 2
    ).sum(-1)
    likelihood.task_noises = s["noise"][0]

    with gpytorch.settings.fast_computations(False, False, False), gpytorch.settings.max_cholesky_size(10**6):
        gp.train(), likelihood.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, gp)(gp(x), y) * y.numel()
        gp.eval(), likelihood.eval()
        xs = grid_points(shape, 2)
        pred = gp(xs)
        ref_mean, ref_var = pred.mean, pred.variance

    with torch.no_grad():
        ours = model.log_likelihood(targets)[0]
    coords = [model.kernel.axis_coordinates(n, 2) for n in shape]
    mean, var = GridPosterior(model, targets).predict(coords)
    assert _rel(ours, mll.detach()) < RTOL
    assert _rel(mean[0].reshape(-1, n_tasks), ref_mean.detach()) < RTOL
    assert _rel(var[0].reshape(-1, n_tasks), ref_var.detach()) < RTOL


def test_prediction_at_training_pixels_is_the_upsampled_grid_subsample():
    model, targets = _random_model("separable", (9, 11), 2, 1, seed=5)
    post = GridPosterior(model, targets)
    m1, v1 = post.predict([model.kernel.axis_coordinates(n, 1) for n in (9, 11)])
    m3, v3 = post.predict([model.kernel.axis_coordinates(n, 3) for n in (9, 11)])
    torch.testing.assert_close(m3[:, ::3, ::3], m1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v3[:, ::3, ::3], v1, rtol=1e-12, atol=1e-12)


def test_chunked_prediction_equals_one_shot():
    model, targets = _random_model("separable", (10, 12), 3, 1, seed=8)
    post = GridPosterior(model, targets)
    coords = [model.kernel.axis_coordinates(n, 2) for n in (10, 12)]
    mean, var = post.predict(coords)
    for rows, m, v in post.predict_in_chunks(coords, chunk_rows=3):
        torch.testing.assert_close(m, mean[:, rows])
        torch.testing.assert_close(v, var[:, rows])


def test_variances_are_positive_and_below_prior():
    model, targets = _random_model("separable", (12, 12), 3, 1, seed=2)
    post = GridPosterior(model, targets)
    _, var = post.predict([model.kernel.axis_coordinates(12, 4)] * 2)
    prior = torch.diagonal(model.task_covariance[0])
    assert (var > 0).all()
    assert (var <= prior + 1e-12).all()
    assert math.isfinite(float(var.sum()))
    assert np.isfinite(var.numpy()).all()


def test_dask_prediction_equals_one_shot_and_is_chunked():
    model, targets = _random_model("separable", (10, 12), 3, 1, seed=9)
    post = GridPosterior(model, targets)
    coords = [model.kernel.axis_coordinates(n, 2) for n in (10, 12)]
    mean, var = post.predict(coords)
    dmean, dvar = post.predict_dask(coords, chunk_rows=6)
    assert dmean.chunks[1] == (6, 6, 6, 2)
    np.testing.assert_allclose(dmean.compute(), mean.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(dvar.compute(), var.numpy(), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="exact: it has no standard error"):
        post.predict_dask(coords, standard_error=True)


@pytest.mark.parametrize("scheduler", [None, "sync", "processes"])
def test_arrays_are_the_dask_chunks_written_in_place_or_gathered(scheduler, monkeypatch):
    import dask
    import dask.array as da

    model, targets = _random_model("separable", (10, 12), 3, 1, seed=9)
    post = GridPosterior(model, targets)
    coords = [model.kernel.axis_coordinates(n, 2) for n in (10, 12)]
    mean, var = post.predict(coords)
    stored = []
    store = da.store
    monkeypatch.setattr(da, "store", lambda *args, **kwargs: stored.append(1) or store(*args, **kwargs))
    with dask.config.set(scheduler=scheduler):
        arrays = post.predict_arrays(coords, chunk_rows=7)
    assert bool(stored) == (scheduler != "processes")  # in place where the workers share the outputs' memory
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float64 for a in arrays)
    np.testing.assert_allclose(arrays[0], mean.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(arrays[1], var.numpy(), rtol=1e-10, atol=1e-14)


def test_every_chunk_hands_its_freed_memory_back(monkeypatch):
    import dask

    from hyperspy_gp.gp import prediction
    from hyperspy_gp.memory import RELEASE_FREED_MEMORY

    model, targets = _random_model("separable", (10, 12), 3, 1, seed=9)
    post = GridPosterior(model, targets)
    coords = [model.kernel.axis_coordinates(n, 2) for n in (10, 12)]
    released = []
    monkeypatch.setattr(prediction, "release_freed_memory", lambda: released.append(1) or True)
    with dask.config.set(scheduler="sync"):
        kept = post.predict_arrays(coords, chunk_rows=7)
    assert len(released) == 3  # 20 rows in chunks of 7
    # Turned off by its dask configuration key: no release, the same numbers.
    with dask.config.set({"scheduler": "sync", RELEASE_FREED_MEMORY: False}):
        unreleased = post.predict_arrays(coords, chunk_rows=7)
    assert len(released) == 3
    for a, b in zip(kept, unreleased):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n_tasks,rank", [(1, 0), (4, 2), (6, 1)])
def test_whitened_and_factorised_blocks_give_the_same_likelihood_gradient_and_weights(monkeypatch, n_tasks, rank):
    """The blocks λ_j B + D solved in the whitened task basis or by Cholesky factors: same numbers."""
    import hyperspy_gp.gp.likelihood as likelihood

    model, targets = _random_model("separable", (9, 7), n_tasks, rank, seed=n_tasks)
    factors = model.kernel.factors(model.lengthscale)
    layout = model.as_factor_layout(targets)

    def evaluate():
        for p in model.parameters():
            p.grad = None
        mll = model.log_likelihood(targets).sum()
        mll.backward()
        solve = likelihood.solve_grid_icm(layout, model.task_covariance, model.noise, factors)
        other = solve.with_targets(2.0 * layout + 1.0)
        return mll.detach(), [p.grad.clone() for p in model.parameters()], solve, other

    mll, grads, solve, other = evaluate()
    assert solve.block_cholesky is None  # a well-conditioned model is solved whitened
    monkeypatch.setattr(likelihood, "WHITENED_ROUNDING_LIMIT", 0.0)
    mll_f, grads_f, solve_f, other_f = evaluate()
    assert solve_f.block_cholesky is not None
    assert float(abs(mll - mll_f)) < 1e-10 * float(abs(mll_f))
    for g, g_f in zip(grads, grads_f):
        torch.testing.assert_close(g, g_f, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(solve.rotated_weights, solve_f.rotated_weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(other.rotated_weights, other_f.rotated_weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(solve.logdet, solve_f.logdet, rtol=1e-12, atol=0.0)
    # the factors formed on demand are the solve's
    torch.testing.assert_close(solve.cholesky, solve_f.cholesky, rtol=1e-12, atol=1e-14)


def test_blocks_too_ill_conditioned_to_whiten_are_factorised_with_jitter():
    from hyperspy_gp.gp.likelihood import solve_grid_icm

    lam = torch.tensor([[1e4, 1.0]], dtype=torch.float64)
    b = torch.full((1, 3, 3), 1e8, dtype=torch.float64)  # rank one: identical maps
    noise = torch.full((1, 3), 1e-10, dtype=torch.float64)
    solve = solve_grid_icm(torch.ones(1, 2, 3, dtype=torch.float64), b, noise, [torch.diag_embed(lam)])
    assert solve.block_cholesky is not None and float(solve.jitter[0]) > 0
    solve = solve_grid_icm(torch.ones(1, 2, 3, dtype=torch.float64), b / 1e8, noise * 1e8, [torch.diag_embed(lam)])
    assert solve.block_cholesky is None and float(solve.jitter[0]) == 0
