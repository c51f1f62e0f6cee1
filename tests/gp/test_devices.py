"""Every engine path, on every available device, equals the dense reference on the CPU.

The model and the maps live on the device; the reference is the dense ``O((nT)³)``
algebra of :mod:`tests.gp.dense_reference` in float64 on the CPU.  On a machine
without a GPU this checks the CPU alone (see :mod:`tests.gp.devices`).
"""

import numpy as np
import pytest
import torch

from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.model import GridICMModel
from hyperspy_gp.gp.prediction import make_posterior
from hyperspy_gp.gp.training import fit_model

from .dense_reference import dense_icm
from .devices import AVAILABLE_DEVICES

RTOL = 1e-6


def _holes(shape):
    observed = np.random.default_rng(0).random(shape) > 0.2
    observed.flat[0] = True
    return observed


def _masked_block(shape):
    observed = _holes(shape)
    observed[3:13, 4:14] = False  # deep enough for coarse points
    return observed


#: name: (kernel, grid, observed pixels, model options, is the posterior variance exact)
PATHS = {
    "kronecker": ("separable", (9, 11), None, {}, True),
    "matern eigen": ("matern", (8, 9), None, {}, True),
    "matern fft-cg": ("matern", (8, 9), None, {"iterative": True, "n_probes": "exact"}, False),
    "missing, dense": ("separable", (9, 11), _holes, {"masked_solver": "dense"}, True),
    "missing, schur": ("separable", (9, 11), _holes, {"masked_solver": "schur"}, True),
    "missing, matern fft-cg": ("matern", (8, 9), _holes, {"iterative": True, "n_probes": "exact"}, False),
    "missing, schur-cg + coarse": ("separable", (16, 16), _masked_block,
                                   {"masked_solver": "schur-cg", "n_probes": "exact"}, False),
}


def _model(path, device):
    """A model of ``path`` with random parameters on ``device``, random maps, the observed mask."""
    kind, shape, make_mask, options, _ = PATHS[path]
    observed = None if make_mask is None else make_mask(shape)
    model = GridICMModel(GridKernel(shape, kind, device=device), 1, 3, rank=1, observed=observed, **options)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.4 * torch.randn(param.shape, generator=gen, dtype=param.dtype).to(device))
    targets = torch.randn(1, *shape, 3, generator=gen, dtype=torch.float64)
    return model, targets.to(device), observed


def _reference(model, targets, observed, upsampling=1):
    """Dense log likelihood, mean, variance and the likelihood's gradient, on the CPU."""
    kind = model.kernel.kind
    twin = GridICMModel(GridKernel(model.kernel.grid_shape, kind), 1, model.n_tasks, rank=model.rank)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            param.copy_(dict(model.named_parameters())[name].cpu())
    mll, mean, variance = dense_icm(targets[0].cpu(), twin.lengthscale[0], twin.task_covariance[0], twin.noise[0],
                                    kind, upsampling=upsampling, observed=observed)
    mll.backward()
    return mll.detach(), mean.detach(), variance.detach(), {n: p.grad for n, p in twin.named_parameters()}


def _rel(a, b):
    return float((a.detach().cpu() - b).norm() / b.norm())


@pytest.mark.parametrize("device", AVAILABLE_DEVICES)
@pytest.mark.parametrize("path", list(PATHS))
def test_likelihood_and_gradient_on_the_device_equal_the_dense_reference(path, device):
    model, targets, observed = _model(path, device)
    if path.endswith("coarse"):
        assert model.coarse_lattice is not None
    mll = model.log_likelihood(targets).sum()
    assert mll.device.type == device
    mll.backward()
    ref_mll, _, _, ref_grad = _reference(model, targets, observed)
    assert _rel(mll, ref_mll) < RTOL
    for name, param in model.named_parameters():
        assert param.grad.device.type == device
        assert _rel(param.grad, ref_grad[name]) < RTOL, name


@pytest.mark.parametrize("device", AVAILABLE_DEVICES)
@pytest.mark.parametrize("path", list(PATHS))
def test_posterior_on_the_device_equals_the_dense_reference(path, device):
    model, targets, observed = _model(path, device)
    coords = [model.kernel.axis_coordinates(n, 2) for n in model.kernel.grid_shape]
    mean, variance = make_posterior(model, targets).predict(coords)
    _, ref_mean, ref_var, _ = _reference(model, targets, observed, upsampling=2)
    assert _rel(mean[0], ref_mean) < RTOL
    if PATHS[path][-1]:
        assert _rel(variance[0], ref_var) < RTOL
    else:  # a Monte-Carlo estimate with a stated standard error (tested in its own module)
        assert float(((variance[0].cpu() - ref_var).abs() / ref_var).mean()) < 0.1


@pytest.mark.parametrize("device", AVAILABLE_DEVICES)
def test_fit_and_chunked_prediction_on_the_device_denoise_a_map(device):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :24]
    truth = np.sin(2 * np.pi * xx / 8) * np.sin(2 * np.pi * yy / 8)
    noisy = truth + 0.3 * rng.standard_normal(truth.shape)
    targets = torch.tensor(noisy[None, ..., None] / noisy.std(), device=device)
    model = GridICMModel(GridKernel((24, 24), device=device), 1, 1, rank=0)
    assert fit_model(model, targets).converged
    posterior = make_posterior(model, targets)
    coords = [model.kernel.axis_coordinates(24, 1)] * 2
    chunks = list(posterior.predict_in_chunks(coords, chunk_rows=5))
    assert len(chunks) == 5
    mean = torch.cat([m.cpu() for _, m, _ in chunks], dim=1)[0, ..., 0].numpy() * noisy.std()
    assert np.sqrt(np.mean((mean - truth) ** 2)) < 0.7 * np.sqrt(np.mean((noisy - truth) ** 2))
    dask_mean, _ = posterior.predict_dask(coords, chunk_rows=7)
    assert isinstance(dask_mean.compute(), np.ndarray)
    np.testing.assert_allclose(dask_mean.compute()[0, ..., 0] * noisy.std(), mean, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", AVAILABLE_DEVICES)
@pytest.mark.parametrize("increase", ["streamed", "windows"])
def test_the_streamed_exact_variance_on_the_device_equals_the_dense_reference(device, increase, monkeypatch):
    from hyperspy_gp import memory

    monkeypatch.setattr(memory, "MAX_SCHUR_ENTRIES", 0)  # no factorised columns: the streamed increase
    monkeypatch.setattr(memory, "STREAM_BLOCK", 16)  # several blocks of missing pixels
    if increase == "windows":  # (windows of 16 px cores, most of this small grid)
        monkeypatch.setattr(memory, "MAX_STREAMED_MISSING_SQUARED", 0)
        monkeypatch.setattr(memory, "MAX_STREAMED_MISSING_SQUARED_GPU", 0)
    model, targets, observed = _model("missing, schur-cg + coarse", device)
    coords = [model.kernel.axis_coordinates(n, 2) for n in model.kernel.grid_shape]
    posterior = make_posterior(model, targets, test_coords=coords)
    assert posterior.variance_is_exact
    mean, variance = posterior.predict(coords)
    assert variance.device.type == device
    _, ref_mean, ref_var, _ = _reference(model, targets, observed, upsampling=2)
    assert _rel(mean[0], ref_mean) < RTOL
    assert _rel(variance[0], ref_var) < RTOL


@pytest.mark.parametrize("device", AVAILABLE_DEVICES)
@pytest.mark.parametrize("path", ["matern fft-cg", "missing, matern fft-cg"])
def test_the_iterative_exact_variance_on_the_device_equals_the_dense_reference(path, device):
    # Given the test grid, the iterative path's variance is exact, window by window.
    model, targets, observed = _model(path, device)
    coords = [model.kernel.axis_coordinates(n, 2) for n in model.kernel.grid_shape]
    posterior = make_posterior(model, targets, test_coords=coords)
    assert posterior.variance_is_exact
    variance = posterior.predict(coords)[1]
    assert variance.device.type == device
    _, _, ref_var, _ = _reference(model, targets, observed, upsampling=2)
    assert _rel(variance[0], ref_var) < RTOL
