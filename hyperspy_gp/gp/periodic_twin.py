r"""The periodic twin: a control variate of the iterative path's variance, solved exactly by FFT.

The iterative path estimates its variance from prior draws on a torus, the circulant
embedding of the upsampled grid (:mod:`~hyperspy_gp.gp.iterative_prediction`).  The
*periodic twin* is the same ICM model observing such a draw at **every** point of the
coarse lattice of that torus, the scan's pixels and the padding around them alike,
with the same noise ``D``.  Its training covariance is then circulant: the twin is
solved exactly by FFT, with one ``T × T`` block ``λ(ω) B + D`` per spatial frequency,
and its posterior variance is the same at every point of a coset of the lattice
(an offset of ``c/u`` pixels): ``u^d × T`` numbers.

Its data are a superset of the model's, so, drawn from the same white noise and noise,
the model's posterior error is the twin's plus a gap independent of it: the model's
variance is the twin's, known exactly, plus the mean square of that gap, which vanishes
more than a few length scales inside the scan and is all that is left to estimate.

With ``g(m) = k(u m)`` and ``h_c(m) = k(u m + c)`` the embedding's kernel (its
spectrum clipped at 0, as the draws have it) on the coarse lattice and at its coset
``c``, and ``λ(ω)``, ``κ_c(ω)`` their DFTs over the ``M`` lattice points,

.. math::

    v_{c,t} = k(0) B_{tt} − \frac1M \sum_ω |κ_c(ω)|^2 \sum_k U_{tk}^2 \frac{γ_k^2}{λ(ω) γ_k + 1},

in the whitened task basis of :func:`~hyperspy_gp.gp.likelihood.whiten_tasks`
(``U = √D R``), as :class:`~hyperspy_gp.gp.prediction.GridPosterior` forms its variance.
Tensors are channel-first, ``(P, R, T, *grid)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from hyperspy_gp.gp.likelihood import whiten_tasks, whitened_variance_reduction
from hyperspy_gp.gp.toeplitz import coset_ranges, irfftn_region


class PeriodicTwin:
    """The ICM model observing every coarse point of a circulant embedding.

    Parameters
    ----------
    power
        The embedding's spectrum clipped at 0 (the draws' covariance), ``(P,
        *rfft_shape)`` of the real FFT over ``fft_shape``.
    fft_shape
        The torus in upsampled pixels, a multiple of ``upsampling`` per axis.
    upsampling
        ``u``: the coarse lattice is every ``u``-th point of the torus.
    task_covariance, noise
        ``B`` ``(P, T, T)`` and ``D`` ``(P, T)``.
    """

    def __init__(self, power: torch.Tensor, fft_shape: Sequence[int], upsampling: int,
                 task_covariance: torch.Tensor, noise: torch.Tensor) -> None:
        if any(n % upsampling for n in fft_shape):
            raise ValueError(f"The torus {tuple(fft_shape)} is not a whole number of {upsampling}-pixel cells.")
        self.power = power
        self.fft_shape = tuple(int(n) for n in fft_shape)
        self.upsampling = int(upsampling)
        self.coarse_shape = tuple(n // upsampling for n in self.fft_shape)
        self.dims = tuple(range(-len(self.fft_shape), 0))
        #: The draws' kernel on the torus, ``(P, *fft_shape)``.
        self.values = torch.fft.irfftn(power, s=self.fft_shape, dim=self.dims)
        #: ``λ(ω)`` on the real-FFT frequencies of the coarse lattice, ``(P, *)``.
        self.eigenvalues = torch.fft.rfftn(self._coset(self.values, (0,) * len(self.dims)),
                                           dim=self.dims).real.clamp_min(0.0)
        self.root, self.gamma, self.rotation = whiten_tasks(task_covariance, noise)

    def _coset(self, x: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
        return x[(..., *(slice(o, None, self.upsampling) for o in offset))]

    def posterior_mean(self, lattice: torch.Tensor, noise: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """The twin's posterior mean ``E[f | f_lattice + e]`` of a draw, on a region at the torus' origin.

        Parameters
        ----------
        lattice
            A draw ``f`` of the prior at the coarse lattice of the torus, ``(P, R, T,
            *coarse_shape)``.
        noise
            The noise ``e`` on the coarse lattice, ``(P, R, T, *coarse_shape)``.
        shape
            The region, in upsampled pixels.

        Returns
        -------
        torch.Tensor
            ``(P, R, T, *shape)``.
        """
        spectrum = torch.fft.rfftn(self.weights(lattice, noise), dim=self.dims)
        u = self.upsampling
        out = lattice.new_empty(*lattice.shape[:3], *shape)
        for combination in itertools.product(*(coset_ranges(0, n, u) for n in shape)):
            offset = [c for c, _, _ in combination]
            out[(..., *(slice(c, None, u) for c in offset))] = self.fitted_coset(
                spectrum, self.coset_kernel_spectrum(offset), [q1 for _, _, q1 in combination])
        return out

    def weights(self, lattice: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The posterior mean's weights ``w`` at every lattice point: ``E[f(x) | ·] = Σ_m k(x − u m) w(m)``."""
        spectrum = self._weights(torch.fft.rfftn(lattice + noise, dim=self.dims))
        return torch.fft.irfftn(spectrum, s=self.coarse_shape, dim=self.dims)

    def coset_kernel_spectrum(self, offset: Sequence[int]) -> torch.Tensor:
        """``κ_c``: the real FFT of the draws' kernel at the lattice's coset ``c``, ``(P, *rfft of coarse_shape)``."""
        return torch.fft.rfftn(self._coset(self.values, offset), dim=self.dims)

    def fitted_coset(self, spectrum: torch.Tensor, kernel_spectrum: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """``Σ_m k(u q + c − u m) w(m)``, a fit at the first ``shape`` points ``q`` of the coset ``c`` of the torus.

        A circular convolution on the coarse lattice with the kernel's coset
        (:meth:`coset_kernel_spectrum`), from the real FFT of the weights, ``(P, R, T,
        *rfft of coarse_shape)``: the temporaries have the lattice's size, not the
        torus', and the ``u^d`` cosets of a region together cost about one inverse FFT
        of the torus.

        Returns
        -------
        torch.Tensor
            ``(P, R, T, *shape)``.
        """
        product = spectrum * kernel_spectrum.reshape(kernel_spectrum.shape[0], 1, 1, *kernel_spectrum.shape[1:])
        return irfftn_region(product, self.coarse_shape, shape)

    def _weights(self, spectrum: torch.Tensor) -> torch.Tensor:
        """``B (λ B + D)^{-1} ŷ = √D R Γ (λ Γ + I)^{-1} Rᵀ ŷ / √D`` at every frequency."""
        view = (self.root.shape[0], 1, self.root.shape[1], *([1] * len(self.dims)))
        rotation = self.rotation.to(spectrum.dtype)
        whitened = torch.einsum("ptk,prt...->prk...", rotation, spectrum / self.root.reshape(view))
        gamma = self.gamma.reshape(view)
        whitened = whitened * (gamma / (self.eigenvalues.unsqueeze(1).unsqueeze(1) * gamma + 1.0))
        return torch.einsum("ptk,prk...->prt...", rotation, whitened) * self.root.reshape(view)

    def prior_variance(self) -> torch.Tensor:
        """Every map's prior variance ``k(0) B_tt = k(0) Σ_k U_tk² γ_k``, ``(P, T)``."""
        loadings = (self.root[:, :, None] * self.rotation).pow(2)  # U_tk², (P, T, K)
        return self.values[(..., *([0] * len(self.dims)))][:, None] * torch.einsum("ptk,pk->pt", loadings, self.gamma)

    def missing_increase(self, missing: torch.Tensor, test: torch.Tensor, block: int = 4096) -> torch.Tensor:
        r"""The variance increase at torus points ``test`` when the twin loses its data at lattice points ``missing``.

        Per whitened map ``k`` the twin's data have the circulant covariance ``A_k = γ_k
        K + I``, whose inverse is the filter ``a_k`` (``1 / (γ_k λ(ω) + 1)``).  Leaving
        out the points ``M`` raises the variance by the Schur complement
        ``Σ_k U_tk² γ_k² g_kᵀ C_k^{-1} g_k`` with ``C_k = (A_k^{-1})_{MM}`` (``a_k`` at the
        differences of ``M``) and ``g_k = (A_k^{-1} k_*)_M``, the FFT convolution of ``a_k``
        with the kernel's coset of the test point: ``|M|³ / 3`` per whitened map, and
        ``|M|²`` per test point.  Float64.

        Parameters
        ----------
        missing
            ``(|M|, d)`` lattice (coarse) indices.
        test
            ``(m, d)`` torus (upsampled) indices.
        block
            Test points per triangular solve.

        Returns
        -------
        torch.Tensor
            ``(P, T, m)``.
        """
        d, u, dims = len(self.dims), self.upsampling, self.dims
        values, lam = self.values.double(), self.eigenvalues.double()
        root, gamma, rotation = self.root.double(), self.gamma.double(), self.rotation.double()
        gains = (root[:, :, None] * rotation).pow(2) * gamma.pow(2)[:, None, :]  # U_tk² γ_k², (P, T, K)
        shape = torch.tensor(self.coarse_shape, device=values.device)
        missing, test = missing.to(values.device).long(), test.to(values.device).long()
        coset, cell = test % u, torch.div(test, u, rounding_mode="floor")
        out = values.new_zeros(gains.shape[0], gains.shape[1], len(test))
        if not len(missing) or not len(test):
            return out
        differences = (missing[:, None, :] - missing[None, :, :]) % shape  # (|M|, |M|, d)
        # The test points of each coset and the spectrum of the kernel's coset: the same for every whitened map.
        cosets = [(torch.nonzero((coset == offset).all(-1)).reshape(-1),
                   torch.fft.rfftn(self._coset(values, offset.tolist()), dim=dims))
                  for offset in torch.unique(coset, dim=0)]
        for k in range(gamma.shape[1]):
            inverse = 1.0 / (lam * gamma[:, k].reshape(-1, *([1] * d)) + 1.0)  # (P, *rfft)
            a = torch.fft.irfftn(inverse, s=self.coarse_shape, dim=dims)
            factor = torch.linalg.cholesky(a[(slice(None), *differences.unbind(-1))])  # C_k, (P, |M|, |M|)
            for at, spectrum in cosets:
                filtered = torch.fft.irfftn(spectrum * inverse, s=self.coarse_shape, dim=dims)  # a_k * k_c
                for start in range(0, len(at), block):
                    points = at[start : start + block]
                    lags = (cell[points][:, None, :] - missing[None, :, :]) % shape  # (b, |M|, d)
                    g = filtered[(slice(None), *lags.unbind(-1))]  # (P, b, |M|)
                    explained = torch.linalg.solve_triangular(factor, g.transpose(-1, -2), upper=False)
                    out[:, :, points] += gains[:, :, k, None] * explained.pow(2).sum(1)[:, None, :]
        return out

    def variance(self, fine_shape: Sequence[int]) -> torch.Tensor:
        """The twin's exact posterior variance on the first ``fine_shape`` torus points, ``(P, T, *fine_shape)``."""
        return tile_cosets(self.coset_variance(), fine_shape)

    def coset_variance(self) -> torch.Tensor:
        """The twin's exact posterior variance at each coset of the lattice, ``(P, T, u, ..., u)``."""
        d, u = len(self.dims), self.upsampling
        lam = torch.fft.fftn(self._coset(self.values, (0,) * d), dim=self.dims).real.clamp_min(0.0)
        whitening = (self.root, self.gamma, self.rotation)
        reduction = whitened_variance_reduction(whitening, lam).movedim(-1, 1)  # (P, T, *coarse)
        prior = self.prior_variance()
        per_coset = torch.empty(*prior.shape, *([u] * d), dtype=prior.dtype, device=prior.device)
        for offset in itertools.product(range(u), repeat=d):
            kappa = torch.fft.fftn(self._coset(self.values, offset), dim=self.dims).abs().pow(2)
            explained = (kappa.unsqueeze(1) * reduction).sum(dim=self.dims) / math.prod(self.coarse_shape)
            per_coset[(..., *offset)] = (prior - explained).clamp_min(0.0)
        return per_coset


def tile_cosets(per_coset: torch.Tensor, fine_shape: Sequence[int], start: int = 0) -> torch.Tensor:
    """Values per coset ``(P, T, u, ..., u)`` on ``fine_shape`` torus points from row ``start`` of the first axis.

    Returns
    -------
    torch.Tensor
        ``(P, T, *fine_shape)``.
    """
    u = per_coset.shape[-1]
    starts = [start] + [0] * (len(fine_shape) - 1)
    index = [torch.arange(s, s + n, device=per_coset.device) % u for s, n in zip(starts, fine_shape)]
    return per_coset[(..., *torch.meshgrid(*index, indexing="ij"))]
