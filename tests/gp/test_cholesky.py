"""Jitter: ill-conditioned covariances are factorised, never NaN, and the jitter is reported."""

import numpy as np
import pytest
import torch

from hyperspy_gp.gp.cholesky import (
    MAX_RELATIVE_JITTER,
    NotPositiveDefiniteError,
    relative_jitter_steps,
    safe_cholesky,
)
from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.model import MIN_NOISE, GridICMModel
from hyperspy_gp.gp.prediction import make_posterior


def test_positive_definite_matrices_get_no_jitter_and_the_plain_factor():
    a = torch.randn(2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spd = a @ a.transpose(-1, -2) + torch.eye(5, dtype=torch.float64)
    chol, jitter = safe_cholesky(spd)
    torch.testing.assert_close(chol, torch.linalg.cholesky(spd), rtol=0, atol=0)
    assert (jitter == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_only_the_singular_model_of_a_batch_is_jittered(dtype):
    ones = torch.ones(4, 4, dtype=dtype) * 1e6  # rank one, large
    batch = torch.stack([torch.eye(4, dtype=dtype), ones])
    chol, jitter = safe_cholesky(batch)
    assert jitter[0] == 0
    assert 0 < jitter[1] <= MAX_RELATIVE_JITTER[dtype] * 1e6
    assert torch.isfinite(chol).all()
    rebuilt = chol[1] @ chol[1].T
    torch.testing.assert_close(rebuilt, ones + jitter[1] * torch.eye(4, dtype=dtype), rtol=1e-5, atol=1e-3)


def test_jitter_steps_grow_up_to_the_maximum():
    steps = relative_jitter_steps(torch.float64)
    assert steps[0] == pytest.approx(10 * torch.finfo(torch.float64).eps)
    assert np.all(np.diff(steps) > 0) and steps[-1] == MAX_RELATIVE_JITTER[torch.float64]


def test_an_indefinite_matrix_is_a_clear_error():
    bad = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))[None]
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite.*dtype='float64'"):
        safe_cholesky(bad)


def test_a_non_finite_matrix_is_not_jittered():
    bad = torch.tensor([[[1.0, np.nan], [np.nan, 1.0]]], dtype=torch.float64)
    with pytest.raises(NotPositiveDefiniteError, match="NaN or inf"):
        safe_cholesky(bad)


def test_gradient_flows_through_the_jittered_factor():
    base = torch.ones(1, 3, 3, dtype=torch.float64)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    chol, jitter = safe_cholesky(scale * base)
    assert jitter[0] > 0
    torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum().backward()
    assert torch.isfinite(scale.grad)


def _degenerate_model(observed=None, kind="separable"):
    """Identical maps, huge rank-one B, length scale ≫ grid, minimum noise."""
    model = GridICMModel(GridKernel((12, 12), kind), 1, 3, rank=1, observed=observed)
    with torch.no_grad():
        model._set("raw_lengthscale", torch.full_like(model.raw_lengthscale, 1e4))
        model._set("raw_noise", torch.full_like(model.raw_noise, MIN_NOISE))
        model._set("raw_task_variance", torch.full_like(model.raw_task_variance, 1e-6))
        model.task_factor.fill_(1e8)
    yy, xx = np.mgrid[:12, :12]
    smooth = np.sin(xx / 4.0) + np.cos(yy / 5.0)
    targets = torch.tensor(np.repeat(smooth[None, ..., None], 3, axis=-1))
    return model, targets


@pytest.mark.parametrize("kind", ["separable", "matern"])
@pytest.mark.parametrize("holes", [False, True])
def test_degenerate_posteriors_are_finite_and_report_their_jitter(kind, holes):
    observed = None
    if holes:
        observed = np.ones((12, 12), dtype=bool)
        observed[3, 4] = False
    model, targets = _degenerate_model(observed, kind)
    loglik = model.log_likelihood(targets)
    assert torch.isfinite(loglik).all()
    posterior = make_posterior(model, targets)
    assert posterior.jitter.shape == (1,) and posterior.jitter[0] > 0
    coords = [torch.arange(24, dtype=torch.float64) / 2] * 2
    mean, variance = posterior.predict(coords)
    assert torch.isfinite(mean).all() and torch.isfinite(variance).all()
    assert (variance >= 0).all()
