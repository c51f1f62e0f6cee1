"""The periodic twin (the iterative variance's second control variate) against dense algebra on the torus."""

import itertools

import pytest
import torch

from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.periodic_twin import PeriodicTwin
from hyperspy_gp.gp.toeplitz import ToeplitzKernel

RTOL = 1e-9


def _twin(fft_shape, upsampling, n_tasks, lengthscale, task_scale=1.0, noise=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fine_shape = [n // 2 for n in fft_shape]
    kernel = GridKernel([max(1, n // upsampling) for n in fine_shape], "matern")
    embedding = ToeplitzKernel(kernel, torch.tensor([lengthscale], dtype=torch.float64), fine_shape,
                               1.0 / upsampling, fft_shape)
    power = embedding.spectrum.real.clamp_min(0.0)
    factor = task_scale * torch.randn(1, n_tasks, 1, generator=gen, dtype=torch.float64)
    task_covariance = factor @ factor.transpose(-1, -2) + 0.1 * torch.eye(n_tasks, dtype=torch.float64)
    noise = noise * (1 + torch.rand(1, n_tasks, generator=gen, dtype=torch.float64))
    return PeriodicTwin(power, fft_shape, upsampling, task_covariance, noise), task_covariance[0], noise[0]


def _dense(twin, task_covariance, noise):
    """Prior covariance on the torus and the posterior operator ``f ↦ B K_fL Σ⁻¹`` (tasks outermost)."""
    shape = twin.fft_shape
    points = torch.tensor(list(itertools.product(*(range(n) for n in shape))))
    offsets = (points[:, None, :] - points[None, :, :]) % torch.tensor(shape)
    k = twin.values[0][tuple(offsets.unbind(-1))]
    lattice = (points % twin.upsampling == 0).all(-1)
    k_ll, k_fl = k[lattice][:, lattice], k[:, lattice]
    sigma = torch.kron(task_covariance, k_ll) + torch.kron(torch.diag(noise), torch.eye(int(lattice.sum()),
                                                                                     dtype=k.dtype))
    gain = torch.kron(task_covariance, k_fl) @ torch.linalg.inv(sigma)
    return torch.kron(task_covariance, k), gain, lattice


@pytest.mark.parametrize("fft_shape, upsampling, n_tasks", [((8, 6), 2, 2), ((9, 6), 3, 1), ((12,), 4, 3)])
def test_the_twins_variance_is_that_of_the_dense_torus_model(fft_shape, upsampling, n_tasks):
    twin, b, noise = _twin(fft_shape, upsampling, n_tasks, [2.5] * len(fft_shape))
    prior, gain, lattice = _dense(twin, b, noise)
    expected = torch.diagonal(prior - gain @ prior[:, torch.cat([lattice] * n_tasks)].T).reshape(n_tasks, *fft_shape)
    variance = twin.variance(fft_shape)[0]
    torch.testing.assert_close(variance, expected, rtol=RTOL, atol=0)
    # The same at every point of a coset, and lower on the lattice than between.
    assert torch.allclose(variance[(..., *([0] * len(fft_shape)))], variance[(..., *([upsampling] * len(fft_shape)))])
    assert (variance[(..., *([1] * len(fft_shape)))] > variance[(..., *([0] * len(fft_shape)))]).all()


def test_the_twins_posterior_mean_is_the_dense_one():
    fft_shape, upsampling, n_tasks = (8, 6), 2, 2
    twin, b, noise = _twin(fft_shape, upsampling, n_tasks, [1.5, 3.0])
    _, gain, lattice = _dense(twin, b, noise)
    gen = torch.Generator().manual_seed(1)
    prior = torch.randn(1, 3, n_tasks, *fft_shape, generator=gen, dtype=torch.float64)
    draw_noise = torch.randn(1, 3, n_tasks, *twin.coarse_shape, generator=gen, dtype=torch.float64)
    on_lattice = prior[..., ::upsampling, ::upsampling]
    mean = twin.posterior_mean(on_lattice, draw_noise, fft_shape)
    flat = prior.reshape(3, n_tasks, -1)
    observed = (flat[..., lattice] + draw_noise.reshape(3, n_tasks, -1)).reshape(3, -1)
    expected = (observed @ gain.T).reshape(1, 3, n_tasks, *fft_shape)
    torch.testing.assert_close(mean, expected, rtol=RTOL, atol=1e-12)
    region = twin.posterior_mean(on_lattice, draw_noise, (5, 4))
    torch.testing.assert_close(region, expected[..., :5, :4], rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("fft_shape, upsampling", [((8, 6), 2), ((9, 6), 3), ((12,), 4)])
def test_the_fit_at_each_coset_is_the_dense_posterior_mean_there(fft_shape, upsampling):
    twin, b, noise = _twin(fft_shape, upsampling, 2, [1.5] * len(fft_shape))
    _, gain, lattice = _dense(twin, b, noise)
    gen = torch.Generator().manual_seed(2)
    prior = torch.randn(1, 3, 2, *fft_shape, generator=gen, dtype=torch.float64)
    draw_noise = torch.randn(1, 3, 2, *twin.coarse_shape, generator=gen, dtype=torch.float64)
    flat = prior.reshape(3, 2, -1)
    observed = (flat[..., lattice] + draw_noise.reshape(3, 2, -1)).reshape(3, -1)
    expected = (observed @ gain.T).reshape(1, 3, 2, *fft_shape)
    on_lattice = prior[(..., *(slice(None, None, upsampling) for _ in fft_shape))]
    spectrum = torch.fft.rfftn(twin.weights(on_lattice, draw_noise), dim=twin.dims)
    region = [max(1, n - 1) for n in twin.coarse_shape]  # the first points of each coset
    for offset in itertools.product(range(upsampling), repeat=len(fft_shape)):
        fitted = twin.fitted_coset(spectrum, twin.coset_kernel_spectrum(offset), region)
        at = (..., *(slice(c, c + upsampling * n, upsampling) for c, n in zip(offset, region)))
        torch.testing.assert_close(fitted, expected[at], rtol=RTOL, atol=1e-12)


def test_the_twins_variance_keeps_its_digits_with_little_noise_and_a_nearly_rank_one_b():
    # B/σ² about 10⁹ with cond(B) about 2·10⁴: the posterior variance on the lattice is
    # 10⁻⁹ of the prior, so an error of 1e-5 relative there is 1e-14 of the prior.  The
    # reference is the dense formula at 40 digits.
    mpmath = pytest.importorskip("mpmath")  # a dependency of torch (through sympy)
    twin, b, noise = _twin((8, 6), 2, 2, [3.0, 3.0], task_scale=30.0, noise=1e-6)
    shape = twin.fft_shape
    points = torch.tensor(list(itertools.product(*(range(n) for n in shape))))
    k = twin.values[0][tuple(((points[:, None, :] - points[None, :, :]) % torch.tensor(shape)).unbind(-1))]
    lattice = (points % 2 == 0).all(-1)
    with mpmath.workdps(40):
        def mp(x):
            return mpmath.matrix(x.tolist())

        def kron(a, c):
            return mpmath.matrix([[a[i // c.rows, j // c.cols] * c[i % c.rows, j % c.cols]
                                   for j in range(a.cols * c.cols)] for i in range(a.rows * c.rows)])

        b_mp, k_ll, k_fl = mp(b), mp(k[lattice][:, lattice]), mp(k[:, lattice])
        sigma = kron(b_mp, k_ll) + kron(mpmath.diag(noise.tolist()), mpmath.eye(k_ll.rows))
        cross = kron(b_mp, k_fl)
        reduction = cross * mpmath.inverse(sigma) * cross.T
        n = len(points)
        dense = torch.tensor([[float(b_mp[t, t] * k[0, 0].item() - reduction[t * n + i, t * n + i]) for i in range(n)]
                              for t in range(2)], dtype=torch.float64).reshape(2, *shape)
    assert float(dense.min()) < 1e-8 * float(dense.max())  # the posterior is many orders below the prior
    variance = twin.variance(shape)[0]
    assert float(((variance - dense) / dense).abs().max()) < 1e-5


def test_a_torus_that_is_not_whole_cells_is_refused():
    with pytest.raises(ValueError, match="whole number"):
        _twin((9, 6), 2, 1, [2.0, 2.0])
