r"""Products with a stationary kernel matrix on a full grid, by FFT (block-Toeplitz).

On a regular grid a stationary kernel, ``k(x, x') = c(x − x')``, gives a
(block-)Toeplitz covariance ``K``.  Embedded in a circulant of twice the size along
every axis, ``K v`` is a zero-padded FFT convolution: ``O(n log n)`` time and ``O(n)``
memory for any stationary kernel, separable or not, and no ``n × n`` matrix.

The same embedding gives bilinear forms ``uᵀ K w = Σ_δ c(δ) R_{uw}(δ)`` through the
cross-correlation ``R_{uw}`` of ``u`` and ``w``: differentiating them in the length
scales only needs ``c`` on the ``2n_1 × … × 2n_d`` offsets, which is how
:mod:`~hyperspy_gp.gp.iterative` gets its gradients.

Where only a region at a torus' origin is wanted back, :func:`irfftn_region`
transforms only that part.  On an upsampled grid the products with weights on the
training pixels go coset by coset, on the training grid's size
(:func:`lattice_product_rows`).

Tensors here are *channel-first*: ``(P, *lead, n_1, ..., n_d)``, with ``P`` models and
any leading channels (probes, maps), so that the FFT runs over contiguous trailing
axes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from hyperspy_gp import memory
from hyperspy_gp.gp.kernels import GridKernel

#: Bytes of complex spectra transformed at once by :meth:`ToeplitzKernel.matmul` (the
#: memory estimate of :mod:`hyperspy_gp.memory` assumes the same).
FFT_GROUP_BYTES = memory.FFT_GROUP_BYTES


def circulant_offsets(length: int, spacing: float, dtype: torch.dtype, device) -> torch.Tensor:
    """Offsets of a circulant embedding of ``length``: ``0, 1, …, length/2, …, 2, 1`` × spacing."""
    index = torch.arange(length, dtype=dtype, device=device)
    return torch.minimum(index, length - index) * spacing


class ToeplitzKernel:
    """The covariance of a stationary kernel on a full grid, applied by FFT.

    Parameters
    ----------
    kernel
        Supplies the kernel formula (:meth:`GridKernel.stationary_values`).
    lengthscale
        ``(P, ndim)`` length scales in pixels of the training grid.  Autograd flows
        from :attr:`values` to them; products use the detached spectrum.
    grid_shape
        Grid in numpy order; the kernel's training grid by default.
    spacing
        Distance between neighbouring grid points in training pixels (``1/u`` for an
        ``u``-times upsampled grid).
    fft_shape
        Size of the circulant embedding per axis, at least ``2n − 1``; ``2n`` by
        default.  Larger embeddings let the kernel decay before it wraps around,
        which sampling (:mod:`~hyperspy_gp.gp.iterative_prediction`) needs.
    """

    def __init__(
        self,
        kernel: GridKernel,
        lengthscale: torch.Tensor,
        grid_shape: Sequence[int] | None = None,
        spacing: float = 1.0,
        fft_shape: Sequence[int] | None = None,
    ) -> None:
        if not kernel.uniform:
            raise ValueError("FFT products need a regular grid; this kernel's training points skip scan lines.")
        self.grid_shape = tuple(kernel.grid_shape if grid_shape is None else grid_shape)
        self.fft_shape = tuple(2 * n for n in self.grid_shape) if fft_shape is None else tuple(fft_shape)
        if any(size < 2 * n - 1 for size, n in zip(self.fft_shape, self.grid_shape)):
            raise ValueError(f"A circulant embedding of {self.grid_shape} needs at least 2n - 1 points per axis.")
        offsets = [circulant_offsets(size, spacing, lengthscale.dtype, lengthscale.device) for size in self.fft_shape]
        #: ``c`` on the circulant offsets, ``(P, *fft_shape)``, differentiable.
        self.values = kernel.stationary_values(lengthscale, offsets)
        self.spectrum = torch.fft.rfftn(self.values.detach(), dim=self.grid_dims)

    @property
    def grid_dims(self) -> tuple[int, ...]:
        """The (negative) tensor dimensions of the grid axes in channel-first tensors."""
        return tuple(range(-len(self.grid_shape), 0))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-padded real FFT of channel-first ``x`` over its grid axes."""
        return torch.fft.rfftn(x, s=self.fft_shape, dim=self.grid_dims)

    def _batched_spectrum(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.dim() - 1 - len(self.grid_shape)
        return self.spectrum.reshape(self.spectrum.shape[0], *([1] * lead), *self.spectrum.shape[1:])

    def matmul_transformed(self, fx: torch.Tensor) -> torch.Tensor:
        """``K x`` from ``fx = transform(x)``."""
        out = torch.fft.irfftn(fx * self._batched_spectrum(fx), s=self.fft_shape, dim=self.grid_dims)
        return out[(..., *(slice(0, n) for n in self.grid_shape))]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``K x`` for channel-first ``x`` ``(P, *lead, *grid)``.

        Channels are transformed a group at a time: spectra of a few megabytes stay
        in cache, which halves the time of one large batched FFT.
        """
        flat = x.reshape(x.shape[0], -1, *self.grid_shape)
        group = max(1, FFT_GROUP_BYTES // (16 * math.prod(self.fft_shape)))
        if flat.shape[1] <= group:
            return self.matmul_transformed(self.transform(x))
        out = torch.empty_like(flat)
        for start in range(0, flat.shape[1], group):
            part = flat[:, start : start + group]
            out[:, start : start + group] = self.matmul_transformed(self.transform(part))
        return out.reshape(x.shape)

    def correlation(self, f_left: torch.Tensor, f_right: torch.Tensor) -> torch.Tensor:
        """``Σ_lead R_{uw}`` on the circulant offsets from the transforms of ``u`` and ``w``.

        With it, ``Σ_lead uᵀ K w = (values · correlation).sum()``.

        Returns
        -------
        torch.Tensor
            ``(P, *fft_shape)``.
        """
        lead_dims = tuple(range(1, f_left.dim() - len(self.grid_shape)))
        product = f_left * f_right.conj()
        if lead_dims:
            product = product.sum(dim=lead_dims)
        return torch.fft.irfftn(product, s=self.fft_shape, dim=self.grid_dims)


def irfftn_region(spectrum: torch.Tensor, fft_shape: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """``irfftn(spectrum)`` on its first ``shape`` points only (a pruned inverse).

    Each leading axis is transformed and cut before the next: where the region is much
    smaller than the torus (long length scales), that halves the work of a whole inverse.
    """
    d = len(fft_shape)
    for axis in range(d - 1):
        dim = axis - d
        spectrum = torch.fft.ifft(spectrum, n=fft_shape[axis], dim=dim).narrow(dim, 0, shape[axis])
    return torch.fft.irfft(spectrum, n=fft_shape[-1], dim=-1)[..., : shape[-1]]


#: Relative kernel value beyond which :func:`lattice_product_rows` leaves training rows
#: out: below float64 rounding (Matérn-5/2 falls under it at about 19 length scales).
HALO_TOLERANCE = 1e-16


def halo_rows(kernel: GridKernel, lengthscale: torch.Tensor, limit: int,
              tolerance: float = HALO_TOLERANCE) -> int:
    """Training rows (pixels along the first axis) beyond which the kernel is below ``tolerance`` of ``k(0)``.

    Both kernels fall monotonically with every offset, so ``k(Δ) ≤ k(Δ_1, 0, …, 0)``
    and a row ``h`` pixels away bounds every farther one.  At most ``limit``.
    """
    with torch.no_grad():
        lags = [torch.arange(limit + 1, dtype=lengthscale.dtype, device=lengthscale.device)]
        lags += [torch.zeros(1, dtype=lengthscale.dtype, device=lengthscale.device)] * (lengthscale.shape[1] - 1)
        values = kernel.stationary_values(lengthscale.detach(), lags).reshape(lengthscale.shape[0], -1)
        small = (values <= tolerance * values[:, :1]).all(0)
    return int(torch.nonzero(small)[0]) if bool(small.any()) else limit


def fast_length(n: int) -> int:
    """The smallest ``2^a 3^b 5^c ≥ n`` (an efficient FFT length)."""
    best = 2 ** math.ceil(math.log2(max(n, 1)))
    odd_5 = 1
    while odd_5 < best:
        odd = odd_5
        while odd < best:
            size = odd
            while size < n:
                size *= 2
            best = min(best, size)
            odd *= 3
        odd_5 *= 5
    return best


def lattice_product_rows(kernel: GridKernel, lengthscale: torch.Tensor, weights: torch.Tensor,
                         origin: Sequence[int], domain_shape: Sequence[int], upsampling: int,
                         rows: tuple[int, int], halo: int) -> torch.Tensor:
    """``Σ_m k(x* − x_m) w(m)`` at rows ``[start, stop)`` of the ``u``-times denser domain grid.

    The weights sit on the training grid, ``origin`` pixels into the domain.  The test
    points of one *coset* (the same offset ``c/u`` from the lattice on every axis) form
    a grid of the training spacing, so their products are a Toeplitz product on the
    coarse grid with the kernel shifted by ``c/u``: one forward FFT of the weights, and
    per coset one inverse FFT of the training grid's size, not the denser grid's.  Only
    the training rows within ``halo`` pixels of the chunk (:func:`halo_rows`) enter, so
    memory grows with the chunk and the halo, not with the domain; the rows left out
    weigh below :data:`HALO_TOLERANCE` of the kernel's variance.

    Parameters
    ----------
    weights
        Channel-first ``(P, *lead, *grid)`` on the training grid.
    rows
        ``(start, stop)`` on the fine domain grid's first axis.

    Returns
    -------
    torch.Tensor
        ``(P, *lead, stop − start, *fine[1:])``.
    """
    u, d, (start, stop) = upsampling, len(domain_shape), rows
    grid, lead = weights.shape[-d:], weights.shape[1:-d]
    out = weights.new_zeros(weights.shape[0], *lead, stop - start, *(n * u for n in domain_shape[1:]))
    first = max(0, -(-start // u) - halo - 1 - origin[0])  # training rows kept: within ``halo`` of the chunk
    last = min(grid[0], (stop - 1) // u + halo + 2 - origin[0])
    if first >= last or stop <= start:
        return out
    kept = weights.narrow(-d, first, last - first).reshape(weights.shape[0], -1, last - first, *grid[1:])
    train = [origin[0] + first, *origin[1:]]  # the kept weights' first point, in coarse domain pixels
    fine = [(start, stop), *((0, n * u) for n in domain_shape[1:])]
    cosets = [coset_ranges(lo, hi, u) for lo, hi in fine]
    lengths = [fast_length(max(q1 - q0 for _, q0, q1 in axis) + n - 1) for axis, n in zip(cosets, kept.shape[2:])]
    dims = tuple(range(-d, 0))
    spectra = {combination: _shifted_kernel_spectrum(kernel, lengthscale, combination, lengths, train, u)
               for combination in itertools.product(*cosets)}
    flat_out = out.reshape(out.shape[0], -1, *out.shape[-d:])
    group = max(1, FFT_GROUP_BYTES // (16 * math.prod(lengths)))
    for g in range(0, kept.shape[1], group):
        transformed = torch.fft.rfftn(kept[:, g : g + group], s=lengths, dim=dims)
        for combination, spectrum in spectra.items():
            product = torch.fft.irfftn(transformed * spectrum.unsqueeze(1), s=lengths, dim=dims)
            target = tuple(slice(u * q0 + c - lo, u * q1 + c - lo, u)
                           for (c, q0, q1), (lo, _) in zip(combination, fine))
            flat_out[(slice(None), slice(g, g + group), *target)] = \
                product[(..., *(slice(0, q1 - q0) for _, q0, q1 in combination))]
    return out


def coset_ranges(low: int, high: int, upsampling: int) -> list[tuple[int, int, int]]:
    """Per offset ``c`` with test points, ``(c, q0, q1)``: the coarse ``q`` with ``u q + c`` in ``[low, high)``."""
    out = []
    for c in range(upsampling):
        q0, q1 = -(-(low - c) // upsampling), -(-(high - c) // upsampling)
        if q1 > q0:
            out.append((c, q0, q1))
    return out


def _shifted_kernel_spectrum(kernel: GridKernel, lengthscale: torch.Tensor, cosets, lengths: Sequence[int],
                             train: Sequence[int], upsampling: int) -> torch.Tensor:
    """The circulant spectrum of the kernel between one coset's test points and the training points, ``(P, *rfft)``.

    Per axis, index ``j`` of the circulant holds the offset ``i − m`` between test ``i``
    and training ``m`` (relative to their first points), ``j`` for ``i ≥ m`` and
    ``j − L`` below, shifted by the first points' distance and ``c/u``.
    """
    lags = []
    for (c, q0, q1), length, first in zip(cosets, lengths, train):
        j = torch.arange(length, dtype=lengthscale.dtype, device=lengthscale.device)
        lags.append(torch.where(j < q1 - q0, j, j - length) + (q0 - first) + c / upsampling)
    values = kernel.stationary_values(lengthscale.detach(), lags)
    return torch.fft.rfftn(values, dim=tuple(range(-len(lags), 0)))
