r"""Products with a stationary kernel matrix on a full grid, by FFT (block-Toeplitz).

On a regular grid a stationary kernel, ``k(x, x') = c(x − x')``, gives a
(block-)Toeplitz covariance ``K``.  Embedded in a circulant of twice the size along
every axis, ``K v`` is a zero-padded FFT convolution: ``O(n log n)`` time and ``O(n)``
memory for any stationary kernel, separable or not, and no ``n × n`` matrix.

The same embedding gives bilinear forms ``uᵀ K w = Σ_δ c(δ) R_{uw}(δ)`` through the
cross-correlation ``R_{uw}`` of ``u`` and ``w``: differentiating them in the length
scales only needs ``c`` on the ``2n_1 × … × 2n_d`` offsets, which is how
:mod:`~hyperspy_gp.gp.iterative` gets its gradients.

Where only part of a torus is wanted back (a region at its origin, or its coarse
lattice), :func:`irfftn_region` and :func:`irfftn_lattice` transform only that part.

Tensors here are *channel-first*: ``(P, *lead, n_1, ..., n_d)``, with ``P`` models and
any leading channels (probes, maps), so that the FFT runs over contiguous trailing
axes.
"""

from __future__ import annotations

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


def irfftn_lattice(spectrum: torch.Tensor, fft_shape: Sequence[int], cell: int) -> torch.Tensor:
    """``irfftn(spectrum)`` at every ``cell``-th point of every axis.

    Sampling folds the spectrum: along each leading (complex) axis of length ``N = cell
    M`` the ``cell`` aliases are summed and transformed at length ``M``.
    """
    d = len(fft_shape)
    for axis in range(d - 1):
        dim = axis - d
        folded = spectrum.unflatten(dim, (cell, fft_shape[axis] // cell)).sum(dim - 1 if dim < 0 else dim)
        spectrum = torch.fft.ifft(folded, dim=dim) / cell
    return torch.fft.irfft(spectrum, n=fft_shape[-1], dim=-1)[..., ::cell]
