"""Matérn-5/2 kernels evaluated on a regular scan grid.

Two kernels are offered, both with one length scale per scan axis (anisotropic) that
may be tied (isotropic):

``"separable"`` (default)
    ``k(r) = k_{5/2}(|Δy|/ℓ_y) · k_{5/2}(|Δx|/ℓ_x)``, a product of 1-D Matérn-5/2
    kernels.  On a full grid its covariance is the Kronecker product ``K_y ⊗ K_x``,
    so exact inference costs ``O(n_y³ + n_x³ + n (n_y + n_x) T + n T²)`` instead of ``O((nT)³)``.
``"matern"``
    the non-separable anisotropic Matérn-5/2 of the method's paper (GPyTorch's
    ``MaternKernel(nu=2.5, ard_num_dims=2)``) with
    ``r² = (Δy/ℓ_y)² + (Δx/ℓ_x)²``.  Here it is handled as one dense ``n × n``
    factor on small grids, and by FFT products (:meth:`GridKernel.stationary_values`,
    :mod:`~hyperspy_gp.gp.iterative`) on large ones.

Both are returned as a list of *factor* matrices so that one engine serves both:
the separable kernel has one factor per axis, the non-separable kernel a single
factor over all pixels.  The kernel has unit prior variance; the amplitude of each
map lives in the task covariance ``B``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

KERNELS = ("separable", "matern")

_SQRT5 = math.sqrt(5.0)


#: Beyond this ``√5 r`` the correlation is below 1e-290; clamping keeps ``exp`` out of
#: subnormal numbers, which are two orders of magnitude slower on x86 CPUs.
_MAX_SCALED_DISTANCE = 680.0


def matern52(r: torch.Tensor) -> torch.Tensor:
    """Matérn-5/2 correlation ``(1 + √5 r + 5r²/3) exp(-√5 r)`` of a scaled distance."""
    s = (_SQRT5 * r).clamp_max(_MAX_SCALED_DISTANCE)
    return (1.0 + s + s * s / 3.0) * torch.exp(-s)


def _matern52_of_squared(r2: torch.Tensor) -> torch.Tensor:
    # The gradient of sqrt at 0 is infinite; clamping keeps it finite and, since
    # d(r²)/dℓ = 0 where Δ = 0, exact.
    return matern52(torch.sqrt(r2.clamp_min(torch.finfo(r2.dtype).tiny)))


class GridKernel:
    """A Matérn-5/2 kernel on the pixel grid ``coords[a] = 0, 1, ..., n_a - 1``.

    Parameters
    ----------
    grid_shape
        Training grid shape in numpy order, e.g. ``(ny, nx)`` or ``(n,)``.
    kind
        ``"separable"`` or ``"matern"`` (see the module docstring).
    dtype, device
        Torch dtype and device of the matrices produced.
    points
        Training coordinates (pixels, increasing) per axis, when they are not
        ``0, 1, ..., n_a - 1``: the scan lines that were measured when whole lines are
        missing.  The grid is then a product of those lines, still Kronecker for the
        separable kernel, but no longer regularly spaced (:attr:`uniform` is false).
    """

    def __init__(
        self,
        grid_shape: Sequence[int],
        kind: str = "separable",
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
        points: Sequence[Sequence[float]] | None = None,
    ) -> None:
        if kind not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, not {kind!r}.")
        self.grid_shape = tuple(int(n) for n in grid_shape)
        self.kind = kind
        self.dtype = dtype
        self.device = torch.device(device)
        if points is None:
            self.points = [self.axis_coordinates(n) for n in self.grid_shape]
        else:
            self.points = [torch.as_tensor(np.asarray(p, dtype=float), dtype=dtype, device=self.device) for p in points]
            if tuple(len(p) for p in self.points) != self.grid_shape:
                raise ValueError(f"points of lengths {[len(p) for p in self.points]} do not match {self.grid_shape}.")
        #: Whether the training points are ``0, 1, ..., n_a - 1`` on every axis (FFT products need it).
        self.uniform = all(torch.equal(p, self.axis_coordinates(len(p))) for p in self.points)

    @property
    def ndim(self) -> int:
        return len(self.grid_shape)

    @property
    def factor_shape(self) -> tuple[int, ...]:
        """Grid shape as seen by the factors (one flat axis when non-separable)."""
        if self.kind == "separable":
            return self.grid_shape
        return (math.prod(self.grid_shape),)

    def axis_coordinates(self, size: int, upsampling: int = 1) -> torch.Tensor:
        """Pixel coordinates of a (possibly upsampled) axis: ``arange(size·u) / u``."""
        return torch.arange(size * upsampling, dtype=self.dtype, device=self.device) / upsampling

    def factors(self, lengthscale: torch.Tensor) -> list[torch.Tensor]:
        """Training covariance factors for a batch of length scales ``(P, ndim)``."""
        return self.cross_factors(lengthscale, self.points)

    def cross_factors(
        self, lengthscale: torch.Tensor, test_coords: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Cross-covariance factors between a test grid and the training grid.

        Parameters
        ----------
        lengthscale
            ``(P, ndim)`` length scales in pixels.
        test_coords
            One 1-D tensor of test coordinates per axis (pixel units).

        Returns
        -------
        list of torch.Tensor
            Separable: one ``(P, m_a, n_a)`` matrix per axis.  Non-separable: a single
            ``(P, Π m_a, Π n_a)`` matrix over the flattened (row-major) grids.
        """
        train = self.points
        if self.kind == "separable":
            return [
                matern52((t[:, None] - x[None, :]).abs() / lengthscale[:, a, None, None])
                for a, (t, x) in enumerate(zip(test_coords, train))
            ]
        return [self.point_kernel(lengthscale, grid_points(test_coords), grid_points(train))]

    def point_kernel(self, lengthscale: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """The kernel between two sets of points ``(m, ndim)`` and ``(n, ndim)``, ``(P, m, n)``.

        For the pixels of a scan that are not a grid: the observed pixels of a sparse
        scan (:mod:`~hyperspy_gp.gp.dense`).

        Examples
        --------
        >>> kernel = GridKernel((4, 4), "matern")
        >>> points = torch.tensor([[0.0, 0.0], [0.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
        >>> kernel.point_kernel(torch.tensor([[2.0, 2.0]], dtype=torch.float64), points, points).shape
        torch.Size([1, 3, 3])
        """
        delta = x1[:, None, :] - x2[None, :, :]  # (m, n, d)
        if self.kind == "separable":
            return matern52(delta.abs()[None] / lengthscale[:, None, None, :]).prod(-1)
        r2 = torch.einsum("mnd,pd->pmn", delta * delta, lengthscale.pow(-2))
        return _matern52_of_squared(r2)

    def training_points(self, index: torch.Tensor) -> torch.Tensor:
        """Coordinates ``(count, ndim)`` of the training pixels at ``index`` ``(count, n_factors)`` (factor layout)."""
        if self.kind == "separable":
            return torch.stack([p[index[:, a]] for a, p in enumerate(self.points)], dim=-1)
        return grid_points(self.points)[index[:, 0]]

    def stationary_values(self, lengthscale: torch.Tensor, lags: Sequence[torch.Tensor]) -> torch.Tensor:
        """The kernel as a function of the offset, on the grid of offsets ``lags``.

        Both kernels are stationary, ``k(x, x') = c(x − x')``; this evaluates ``c``
        with the same formula as :meth:`cross_factors`, which is what the FFT
        (block-Toeplitz) products of :mod:`~hyperspy_gp.gp.toeplitz` need.

        Parameters
        ----------
        lengthscale
            ``(P, ndim)`` length scales in pixels.
        lags
            One 1-D tensor of offsets (pixels) per scan axis.

        Returns
        -------
        torch.Tensor
            ``(P, len(lags[0]), ..., len(lags[-1]))``, differentiable in ``lengthscale``.
        """
        scaled = [lag.abs()[None, :] / lengthscale[:, a, None] for a, lag in enumerate(lags)]
        shape = [lengthscale.shape[0], *(len(lag) for lag in lags)]

        def on_axis(values: torch.Tensor, axis: int) -> torch.Tensor:
            view = [values.shape[0]] + [1] * len(lags)
            view[axis + 1] = -1
            return values.reshape(view)

        if self.kind == "separable":
            out = torch.ones(shape, dtype=lengthscale.dtype, device=lengthscale.device)
            for axis, r in enumerate(scaled):
                out = out * on_axis(matern52(r), axis)
            return out
        r2 = sum(on_axis(r * r, axis) for axis, r in enumerate(scaled))
        return _matern52_of_squared(r2.expand(shape))

    def test_shape(self, test_coords: Sequence[torch.Tensor]) -> tuple[int, ...]:
        """Shape, in factor layout, of a prediction on ``test_coords``."""
        if self.kind == "separable":
            return tuple(len(t) for t in test_coords)
        return (math.prod(len(t) for t in test_coords),)


def grid_points(coords: Sequence[torch.Tensor]) -> torch.Tensor:
    """The points ``(Π m_a, ndim)`` of the grid with coordinates ``coords`` per axis, row-major."""
    mesh = torch.meshgrid(*coords, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=-1)
