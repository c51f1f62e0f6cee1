"""Property-based tests of the engine (hypothesis): what holds for any hyperparameters.

Small grids and few examples keep the module fast; every property is checked on
both inference paths (Kronecker eigenbasis and dense with missing pixels) and both
kernels.
"""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.model import MIN_NOISE, GridICMModel
from hyperspy_gp.gp.prediction import make_posterior

PROPERTY_SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


@st.composite
def problems(draw):
    """A model with fixed random hyperparameters, its training maps and an upsampling."""
    shape = tuple(draw(st.lists(st.integers(2, 6), min_size=1, max_size=2)))
    n_tasks = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["separable", "matern"])) if len(shape) == 2 else "separable"
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    observed = None
    if draw(st.booleans()):
        observed = rng.random(shape) > 0.25
        observed.flat[0] = True
    model = GridICMModel(GridKernel(shape, kind), 1, n_tasks, rank=1, observed=observed)
    lengthscale = draw(st.floats(0.5, 50.0))
    noise = draw(st.floats(2 * MIN_NOISE, 2.0))  # × [0.5, 1.5] stays ≥ MIN_NOISE
    with torch.no_grad():
        model._set("raw_lengthscale", torch.full_like(model.raw_lengthscale, lengthscale))
        model._set("raw_noise", torch.tensor(noise * rng.uniform(0.5, 1.5, (1, n_tasks))))
        model._set("raw_task_variance", torch.tensor(rng.uniform(0.01, 2.0, (1, n_tasks))))
        model.task_factor.copy_(torch.tensor(rng.normal(size=(1, n_tasks, 1))))
    targets = torch.tensor(rng.normal(size=(1, *shape, n_tasks)))
    upsampling = draw(st.integers(1, 3))
    return model, targets, upsampling


def _predict(model, targets, upsampling):
    coords = [model.kernel.axis_coordinates(n, upsampling) for n in model.kernel.grid_shape]
    return make_posterior(model, targets).predict(coords)


@PROPERTY_SETTINGS
@given(problems())
def test_variance_is_finite_nonnegative_and_below_the_prior(problem):
    model, targets, upsampling = problem
    mean, variance = _predict(model, targets, upsampling)
    prior = torch.diagonal(model.task_covariance, dim1=-2, dim2=-1).detach()
    assert torch.isfinite(mean).all() and torch.isfinite(variance).all()
    assert (variance >= 0).all()
    assert (variance <= prior.reshape(1, *[1] * len(model.kernel.grid_shape), -1) * (1 + 1e-9) + 1e-12).all()


@PROPERTY_SETTINGS
@given(problems(), st.randoms(use_true_random=False))
def test_mean_and_variance_are_equivariant_to_the_order_of_the_maps(problem, random):
    model, targets, upsampling = problem
    perm = list(range(model.n_tasks))
    random.shuffle(perm)
    permuted = GridICMModel(model.kernel, 1, model.n_tasks, rank=1, observed=model.observed)
    with torch.no_grad():
        permuted.raw_lengthscale.copy_(model.raw_lengthscale)
        permuted.raw_noise.copy_(model.raw_noise[:, perm])
        permuted.raw_task_variance.copy_(model.raw_task_variance[:, perm])
        permuted.task_factor.copy_(model.task_factor[:, perm])
    mean, variance = _predict(model, targets, upsampling)
    mean_p, variance_p = _predict(permuted, targets[..., perm], upsampling)
    torch.testing.assert_close(mean_p, mean[..., perm], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(variance_p, variance[..., perm], rtol=1e-7, atol=1e-9)


@PROPERTY_SETTINGS
@given(problems())
def test_upsampled_grid_contains_the_training_grid_prediction(problem):
    model, targets, upsampling = problem
    mean_1, variance_1 = _predict(model, targets, 1)
    mean_u, variance_u = _predict(model, targets, upsampling)
    every = (slice(None),) + (slice(None, None, upsampling),) * len(model.kernel.grid_shape)
    assert mean_u.shape[1:-1] == tuple(n * upsampling for n in model.kernel.grid_shape)
    torch.testing.assert_close(mean_u[every], mean_1, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(variance_u[every], variance_1, rtol=1e-8, atol=1e-10)
