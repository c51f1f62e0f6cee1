r"""The periodic twin: a control variate of the iterative path's variance, solved exactly by FFT.

The iterative path estimates its variance from prior draws on a torus, the circulant
embedding of the upsampled grid (:mod:`~hyperspy_gp.gp.iterative_prediction`).  The
*periodic twin* is the same ICM model observing such a draw at **every** point of the
coarse lattice of that torus, the scan's pixels and the padding around them alike,
with the same noise ``D``.  Its training covariance is then circulant: the twin is
solved exactly by FFT, with one ``T × T`` block ``λ(ω) B + D`` per spatial frequency,
and its posterior variance is the same at every point of a coset of the lattice
(an offset of ``c/u`` pixels): ``u^d × T`` numbers.

Drawn from the same white noise and noise, the twin's posterior error nearly equals
the model's away from the scan's edges and missing pixels, where the padding's data
make little difference.  As a second control variate next to the separable twin it
removes most of the Monte-Carlo error there; near the edges the separable twin does
better, and the estimate regresses on both.

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
from hyperspy_gp.gp.toeplitz import irfftn_region


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

    def errors(self, lattice: torch.Tensor, region: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The twin's posterior error ``f − E[f | f_lattice + e]`` on a region at the torus' origin.

        Parameters
        ----------
        lattice
            A draw ``f`` of the prior at the coarse lattice of the torus, ``(P, R, T,
            *coarse_shape)``.
        region
            The same draw on the region, ``(P, R, T, *shape)``.
        noise
            The noise ``e`` on the coarse lattice, ``(P, R, T, *coarse_shape)``.

        Returns
        -------
        torch.Tensor
            ``(P, R, T, *shape)``; one map's spectrum at a time is transformed.
        """
        shape = region.shape[3:]
        weights = torch.fft.irfftn(self._weights(torch.fft.rfftn(lattice + noise, dim=self.dims)),
                                   s=self.coarse_shape, dim=self.dims)
        # The weights placed on the lattice of the torus have the coarse spectrum, tiled.
        coarse = torch.fft.fftn(weights, dim=self.dims)
        tiles = torch.meshgrid(*(torch.arange(n, device=region.device) % m
                                 for n, m in zip(self.power.shape[1:], self.coarse_shape)), indexing="ij")
        power = self.power.unsqueeze(1)
        out = torch.empty_like(region)
        for task in range(region.shape[2]):
            fitted = irfftn_region(coarse[:, :, task][(..., *tiles)] * power, self.fft_shape, shape)
            out[:, :, task] = region[:, :, task] - fitted
        return out

    def _weights(self, spectrum: torch.Tensor) -> torch.Tensor:
        """``B (λ B + D)^{-1} ŷ = √D R Γ (λ Γ + I)^{-1} Rᵀ ŷ / √D`` at every frequency."""
        view = (self.root.shape[0], 1, self.root.shape[1], *([1] * len(self.dims)))
        rotation = self.rotation.to(spectrum.dtype)
        whitened = torch.einsum("ptk,prt...->prk...", rotation, spectrum / self.root.reshape(view))
        gamma = self.gamma.reshape(view)
        whitened = whitened * (gamma / (self.eigenvalues.unsqueeze(1).unsqueeze(1) * gamma + 1.0))
        return torch.einsum("ptk,prk...->prt...", rotation, whitened) * self.root.reshape(view)

    def variance(self, fine_shape: Sequence[int]) -> torch.Tensor:
        """The twin's exact posterior variance on the first ``fine_shape`` torus points, ``(P, T, *fine_shape)``."""
        d, u = len(self.dims), self.upsampling
        lam = torch.fft.fftn(self._coset(self.values, (0,) * d), dim=self.dims).real.clamp_min(0.0)
        whitening = (self.root, self.gamma, self.rotation)
        reduction = whitened_variance_reduction(whitening, lam).movedim(-1, 1)  # (P, T, *coarse)
        loadings = (self.root[:, :, None] * self.rotation).pow(2)  # U_tk², (P, T, K)
        prior = self.values[(..., *([0] * d))][:, None] * torch.einsum("ptk,pk->pt", loadings, self.gamma)
        per_coset = torch.empty(*prior.shape, *([u] * d), dtype=prior.dtype, device=prior.device)
        for offset in itertools.product(range(u), repeat=d):
            kappa = torch.fft.fftn(self._coset(self.values, offset), dim=self.dims).abs().pow(2)
            explained = (kappa.unsqueeze(1) * reduction).sum(dim=self.dims) / math.prod(self.coarse_shape)
            per_coset[(..., *offset)] = (prior - explained).clamp_min(0.0)
        index = [torch.arange(n, device=prior.device) % u for n in fine_shape]
        return per_coset[(..., *torch.meshgrid(*index, indexing="ij"))]
