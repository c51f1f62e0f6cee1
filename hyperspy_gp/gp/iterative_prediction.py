r"""Prediction of the iterative path: exact mean; exact variance, or an exact part plus a Monte-Carlo gap.

Mean.  ``μ(x*) = k*ᵀ (α B)`` with ``α = Σ^{-1} y`` from conjugate gradients.  On an
``u``-times denser grid the test pixels at one offset from the training pixels form a
grid of the training spacing, so ``k*ᵀ v`` for them is an FFT product on the training
grid with the kernel shifted by that offset, for any chunk of test rows from the
training rows within the kernel's reach
(:func:`~hyperspy_gp.gp.toeplitz.lattice_product_rows`).  No ``n_test × n_train``
matrix is formed.

Variance.  An exact per-pixel variance needs one solve per test pixel.  Instead it is
split into a part known exactly and a small remainder near the edges and missing
pixels.  Given the test grid (``test_coords``), the remainder is computed exactly,
window by window, where that is affordable (:mod:`~hyperspy_gp.gp.window_variance`),
or within a stated bound by windows with shorter margins where those are.
Otherwise it is estimated from ``S`` prior draws:

* The *periodic twin* (:mod:`~hyperspy_gp.gp.periodic_twin`) is the same model
  observing a draw at every coarse point of the torus that embeds the upsampled grid
  (the scan and the padding around it).  It is solved exactly by FFT, and so is its
  variance ``v_per``.
* Its data are a superset of the model's.  So for a draw ``f`` with noise ``e``, the
  model's posterior error ``d = f* − E[f* | scan]`` is the twin's error plus the gap
  ``h = E[f* | torus] − E[f* | scan]``, independent of it (Matheron's rule, and the
  orthogonality of conditional expectations), and

  .. math::  \mathrm{var}(x*) = v_{per}(x*) + E[h(x*)^2].

* ``h`` vanishes more than a few length scales inside the scan, and only the draw at
  the lattice enters it (``f*`` cancels).  Its mean square is estimated from the draws
  with a control variate: the same gap ``g`` of the *separable* model (the CG
  preconditioner's kernel) and its own periodic twin, drawn from the same white noise,
  whose ``E[g²] = v_sep − v_{sep,per}`` is exact (:class:`~hyperspy_gp.gp.prediction.GridPosterior`).

The estimate is never below ``v_per``.  Its error lies within a few length scales of the
edges and of missing pixels: on 40 × 36 maps at 2× with 64 draws, an rms error of 0.8 %
of the variance (2.1 % when the squared error itself was regressed on both twins), and
5e-13 further inside.  :meth:`IterativePosterior.variance_standard_error` reports the
estimated standard error of every pixel.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from hyperspy_gp.gp import window_variance
from hyperspy_gp.gp.iterative import (
    CG_TOLERANCE,
    ESTIMATE_CG_TOLERANCE,
    MAX_CG_ITERATIONS,
    KroneckerPreconditioner,
    operator_and_preconditioner,
    preconditioned_cg,
)
from hyperspy_gp.gp.iterative_missing import observed_block_preconditioner
from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.periodic_twin import PeriodicTwin, tile_cosets
from hyperspy_gp.gp.prediction import DEFAULT_CHUNK_BYTES, GridPosterior, Posterior
from hyperspy_gp.gp.schur import columns_fit
from hyperspy_gp.gp.schur_windows import WINDOW_LENGTHSCALES
from hyperspy_gp.gp.toeplitz import ToeplitzKernel, fast_length, halo_rows, lattice_product_rows
from hyperspy_gp.memory import VARIANCE_DRAWS

_logger = logging.getLogger(__name__)

#: Joint prior draws of the variance estimate (``gp_reconstruct(variance_samples=...)``).
DEFAULT_VARIANCE_SAMPLES = VARIANCE_DRAWS
#: Length scales at which the sampling embedding wraps around: its periodic kernel is
#: the true one up to there, and Matérn-5/2 has decayed to 6e-10 at 12 length scales.
#: An embedding cut earlier leaves negative circulant eigenvalues, i.e. prior draws
#: whose covariance is off by that much, which matters where the posterior variance is
#: many orders of magnitude below the prior (smooth maps, length scales beyond the scan,
#: little noise).  Measured on 12 × 10 × 2 maps at 32 px with ``B/σ²`` about 10⁷ (as
#: fitted on a 20 × 18 scan), 256 draws: an embedding wrapping at 7.5 length scales (the
#: reach of 14 used to be split between both sides) biased the variance by +10 %.
EMBEDDING_LENGTHSCALES = 12.0
#: ... but at most this many points in all (length scales far beyond the scan would need
#: embeddings of billions of points; the clipped part of the spectrum is then reported
#: with a warning).
MAX_EMBEDDING_POINTS = 2**21
#: Fraction of the embedding's spectrum that may be clipped (negative) before its prior
#: draws and periodic twin are taken as biased.
CLIPPED_SPECTRUM_TOLERANCE = 1e-6


def _embedding_shape(fine_shape, reach, cell: int = 1) -> list[int]:
    """Embedding lengths that wrap around at ``reach`` (and beyond the grid), shrunk to :data:`MAX_EMBEDDING_POINTS`.

    A circulant of length ``N`` holds the kernel at offsets up to ``N / 2``: ``N = 2 max(m,
    reach)`` per axis, rounded up to a multiple of ``cell`` (the upsampling, so that the
    coarse lattice tiles the torus, :mod:`~hyperspy_gp.gp.periodic_twin`).
    """
    wanted = [2 * max(m, math.ceil(r)) for m, r in zip(fine_shape, reach)]
    shrink = min(1.0, (MAX_EMBEDDING_POINTS / math.prod(wanted)) ** (1 / len(wanted)))
    return [cell * fast_length(math.ceil(max(2 * m, int(w * shrink)) / cell)) for m, w in zip(fine_shape, wanted)]


def lattice_upsampling(test_coords: Sequence[torch.Tensor], limit: int = 64) -> int:
    """The smallest ``u`` such that every test coordinate is a multiple of ``1/u``."""
    values = torch.cat([c.reshape(-1) for c in test_coords]).double()
    for u in range(1, limit + 1):
        if torch.allclose(values * u, torch.round(values * u), atol=1e-9):
            return u
    raise ValueError("The iterative path predicts on grids with spacing 1/u of the scan step only.")


def _circulant_sqrt_spectrum(toeplitz: ToeplitzKernel) -> tuple[torch.Tensor, float]:
    """``√max(Λ, 0)`` of the circulant embedding and the fraction of negative mass clipped."""
    spectrum = torch.fft.rfftn(toeplitz.values.detach(), dim=toeplitz.grid_dims).real
    clipped = float(spectrum.clamp_max(0).abs().sum() / spectrum.abs().sum())
    return spectrum.clamp_min(0).sqrt(), clipped


def _task_sqrt(task_covariance: torch.Tensor) -> torch.Tensor:
    """A square root ``R`` with ``R Rᵀ = B`` (eigenvalues clipped at 0)."""
    lam, vec = torch.linalg.eigh(task_covariance)
    return vec * lam.clamp_min(0).sqrt().unsqueeze(-2)


class IterativePosterior(Posterior):
    """The fitted iterative-path model conditioned on its training maps.

    With windows (:attr:`window_lengthscales`), every chunk of test rows is computed on
    its own (:meth:`rows`), from the variance's parts computed once per test grid, so
    memory grows with the chunk, not the grid.  A Monte-Carlo variance draws whole maps:
    then the mean, variance and standard error of the whole upsampled grid are
    computed at the first prediction and kept, and chunks and dask tasks slice them.

    Parameters
    ----------
    model
        A fitted :class:`~hyperspy_gp.gp.model.GridICMModel` with ``iterative=True``.
    targets
        ``(P, *grid, T)`` standardised training maps.
    n_samples
        Prior draws of the variance estimate.
    seed
        Seed of the draws (predictions are deterministic).
    domain
        ``(origin, shape)``: predictions cover ``shape`` pixels per axis, starting
        ``origin`` pixels before the training grid (which must lie inside), e.g. a whole
        scan around the box of its measured pixels.  The training grid by default.
    test_coords
        The test grid to be predicted (one 1-D tensor per axis, pixels of the training
        grid).  Given, the variance is exact (:mod:`~hyperspy_gp.gp.window_variance`)
        where its windows are affordable there (:attr:`variance_is_exact`), else
        within the stated bound of windows with a shorter margin where those are
        (:attr:`window_lengthscales`, :attr:`variance_error_bound`); otherwise, or
        without it, it is drawn.
    exact_variance
        Whether the windows' variance may be chosen (``False``: always drawn).
    """

    variance_is_exact = False

    def __init__(self, model, targets: torch.Tensor, n_samples: int = DEFAULT_VARIANCE_SAMPLES,
                 seed: int = 0, domain=None, test_coords: Sequence[torch.Tensor] | None = None,
                 exact_variance: bool = True) -> None:
        self.model = model
        self.n_samples, self.seed = int(n_samples), int(seed)
        grid = model.kernel.grid_shape
        origin, shape = ((0,) * len(grid), grid) if domain is None else domain
        self.origin, self.domain_shape = tuple(int(o) for o in origin), tuple(int(n) for n in shape)
        if any(o < 0 or o + n > m for o, n, m in zip(self.origin, grid, self.domain_shape)):
            raise ValueError(f"The training grid {grid} at {self.origin} is not inside the domain {self.domain_shape}.")
        with torch.no_grad():
            self.lengthscale = model.lengthscale.detach().clone()
            self.task_covariance = model.task_covariance.detach().clone()
            self.noise = model.noise.detach().clone()
            toeplitz = ToeplitzKernel(model.kernel, self.lengthscale)
            observed = None if model.observed is None else torch.as_tensor(model.observed, device=targets.device)
            self._operator, self._preconditioner = operator_and_preconditioner(
                model.kernel, toeplitz, self.lengthscale, self.task_covariance, self.noise, observed)
            #: 1 at the observed training pixels, ``(*grid)`` (all ones for a complete grid).
            self.mask = torch.ones(model.kernel.grid_shape, dtype=targets.dtype, device=targets.device) \
                if observed is None else self._operator.mask
            y = targets.detach().movedim(-1, 1).unsqueeze(1).masked_fill(self.mask == 0, 0.0)
            alpha = self._solve(y)
            #: ``α B`` in channel-first layout ``(P, T, *grid)``.
            self.mean_weights = self._operator.mix(alpha)[:, 0]
        #: Per upsampling, the plan of the exact variance (:mod:`~hyperspy_gp.gp.window_variance`).
        self._plans: dict[int, window_variance.VariancePlan] = {}
        if exact_variance and test_coords is not None:
            self._plan_exact_variance(test_coords)
        if self.window_lengthscales is None:
            self._prepare_draws(model, targets, observed)
        self.jitter = torch.zeros(targets.shape[0], dtype=targets.dtype, device=targets.device)
        self._maps: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._windowed: dict[int, window_variance.WindowedVariance] = {}
        #: Training rows beyond which the mean's kernel products ignore the weights (:func:`halo_rows`).
        self.halo = halo_rows(model.kernel, self.lengthscale, self.domain_shape[0])
        self._lock = threading.Lock()

    def _plan_exact_variance(self, test_coords: Sequence[torch.Tensor]) -> None:
        """Take the windows' variance on ``test_coords``, with the longest margin that is affordable (logged).

        The margins of :data:`~hyperspy_gp.gp.window_variance.MARGIN_ERROR_BOUNDS` are
        tried longest first; the full one is exact (:attr:`variance_is_exact`), a shorter
        one within its stated bound (:attr:`variance_error_bound`).  Where none is
        affordable the variance is drawn.
        """
        kernel = self.model.kernel
        p, t = self.task_covariance.shape[:2]
        n_fine = math.prod(len(c) for c in test_coords)
        drawn = window_variance.drawn_variance_cost(n_fine, t, p, self.n_samples)
        for lengthscales in window_variance.MARGIN_ERROR_BOUNDS:
            plan = window_variance.plan_exact_variance(kernel, self.lengthscale, self.mask, test_coords,
                                                       lengthscales=lengthscales)
            windows, points = plan.windows, plan.twin_points
            distinct = [window for window, _ in window_variance.distinct_windows(windows, kernel.points, test_coords)]
            n_missing = int((self.mask == 0).sum()) if len(points) else 0
            cost = window_variance.window_variance_cost(distinct, t, p, n_missing, len(points))
            if window_variance.window_variance_fits(distinct, t, p, str(self.noise.device), drawn, n_missing,
                                                    len(points)):
                self._plans[lattice_upsampling(test_coords)] = plan
                self.window_lengthscales, self.n_samples = lengthscales, 0
                self.variance_is_exact = lengthscales == WINDOW_LENGTHSCALES
                bound = window_variance.margin_error_bound(lengthscales, self.lengthscale)
                self.variance_error_bound = 0.0 if self.variance_is_exact else bound
                _logger.info("Iterative posterior: %s variance, the periodic twin's, its increase from %d missing "
                             "pixels at %d test points, and %d windows of %g length scales near the edges and missing "
                             "pixels (%d distinct; %.2g multiply-adds, the draws about %.2g)",
                             "exact" if self.variance_is_exact else f"windowed (within {bound:g} relative)",
                             n_missing, len(points), len(windows), lengthscales, len(distinct), cost, drawn)
                return
        _logger.info("Iterative posterior: the variance's %d distinct windows even at %g length scales (%.2g "
                     "multiply-adds, largest %d pixels; the draws about %.2g) are beyond its limits or not worth it; "
                     "Monte-Carlo variance from %d draws", len(distinct), lengthscales, cost,
                     max((math.prod(w.shape) for w in distinct), default=0), drawn, self.n_samples)

    def _prepare_draws(self, model, targets: torch.Tensor, observed) -> None:
        """The Monte-Carlo variance's control variate: the separable model's exact posterior."""
        with torch.no_grad():
            # The control variate's twin: Σ_sep⁻¹ exactly (the CG preconditioner's
            # eigenvalues are corrected towards K, the twin's are not); with missing
            # pixels Σ_sep,OO⁻¹ where the twin's exact variance (Schur columns) fits,
            # else the complete grid's (a weaker control variate near missing pixels).
            separable = KroneckerPreconditioner.build(model.kernel, self.lengthscale, self.task_covariance,
                                                      self.noise)
            masked_twin = observed is not None and columns_fit(model)
            self._twin_mask = self.mask if masked_twin else torch.ones_like(self.mask)
            self._separable_inverse = observed_block_preconditioner(separable, observed).solve if masked_twin \
                else separable.solve
        self._separable = _separable_twin(model, targets.masked_fill(self.mask[..., None] == 0, 0.0), masked_twin)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _solve(self, rhs: torch.Tensor, tolerances: dict | None = None) -> torch.Tensor:
        tol = (tolerances or CG_TOLERANCE).get(rhs.dtype, 1e-5)
        return preconditioned_cg(self._operator, self._preconditioner.solve, rhs, tol, MAX_CG_ITERATIONS).solution

    def _solve_draws(self, rhs: torch.Tensor) -> torch.Tensor:
        """The variance draws' solves, to :data:`~hyperspy_gp.gp.iterative.ESTIMATE_CG_TOLERANCE`."""
        return self._solve(rhs, ESTIMATE_CG_TOLERANCE)

    def default_chunk_rows(self, test_coords: Sequence[torch.Tensor]) -> int:
        """Rows per chunk: all where the variance is drawn (its FFTs take whole maps), else bounded.

        With windows, a chunk's arrays stay under
        :data:`~hyperspy_gp.gp.prediction.DEFAULT_CHUNK_BYTES` but a chunk holds at least
        twice the mean's halo (:func:`~hyperspy_gp.gp.toeplitz.halo_rows`), so that the
        halo at most doubles the mean's FFTs.
        """
        n_rows = len(test_coords[0])
        if self.window_lengthscales is None:
            return n_rows
        p, t = self.task_covariance.shape[:2]
        per_row = CHUNK_ROW_ARRAYS * 8 * p * (t + 1) * math.prod(len(c) for c in test_coords[1:])
        halo = 2 * self.halo * lattice_upsampling(test_coords)
        return max(1, min(n_rows, max(DEFAULT_CHUNK_BYTES // per_row, halo)))

    def predict_dask(self, test_coords: Sequence[torch.Tensor], chunk_rows: int | None = None,
                     standard_error: bool = False):
        """:meth:`Posterior.predict_dask`, with the windows' variance parts computed first.

        They are small: computed here, the graph ships them, and the workers of a
        ``dask.distributed`` cluster do not each compute them again.
        """
        if self.window_lengthscales is not None:
            self._windowed_variance(lattice_upsampling(test_coords))
        return super().predict_dask(test_coords, chunk_rows=chunk_rows, standard_error=standard_error)

    def predict(self, test_coords: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and variance ``(P, m_1, ..., m_d, T)`` at the grid of ``test_coords``."""
        mean, variance, _ = self._select(test_coords)
        return mean, variance

    def predict_with_standard_error(self, test_coords: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Mean, variance and its standard error (or bound), ``(P, m_1, ..., m_d, T)`` each, in one pass."""
        self._require_drawn_variance()
        return self._select(test_coords)

    def variance_standard_error(self, test_coords: Sequence[torch.Tensor]) -> torch.Tensor:
        """Estimated standard error of the variance at the grid of ``test_coords``, ``(P, m_1, ..., m_d, T)``."""
        return self._select(test_coords)[2]

    def _select(self, test_coords: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Mean, variance and its standard error at ``test_coords``.

        Drawn, from the cached whole maps; with windows, from the rows of the domain grid
        that the test rows span (:meth:`rows`).
        """
        upsampling = lattice_upsampling(test_coords)
        index = [torch.round((c.detach().cpu().double() + o) * upsampling).long().numpy()
                 for c, o in zip(test_coords, self.origin)]
        if any(len(i) and (i.min() < 0 or i.max() >= n * upsampling) for i, n in zip(index, self.domain_shape)):
            raise ValueError("Test coordinates outside the prediction domain of the iterative posterior "
                             f"({self.domain_shape} pixels from {[-o for o in self.origin]}).")
        if self.window_lengthscales is None:
            maps = self.upsampled_maps(upsampling)
        else:
            start, stop = (int(index[0].min()), int(index[0].max()) + 1) if len(index[0]) else (0, 0)
            maps = self.rows(upsampling, start, stop)
            index[0] = index[0] - start
        device = self.mean_weights.device
        whole = all(np.array_equal(i, np.arange(len(i))) for i in index)
        if whole and self.window_lengthscales is not None:  # (a chunk's rows, its own: no copy)
            return tuple(x.to(device) for x in maps)
        selector = (slice(None), *np.ix_(*index), slice(None))
        return tuple(x[selector].to(device) for x in maps)

    def upsampled_maps(self, upsampling: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and its standard error on the whole ``u``-times denser domain grid, ``(P, *fine, T)`` each.

        Drawn, the variance takes whole maps: they are computed once and cached.  With
        windows, :meth:`rows` of the whole grid (not kept).
        """
        if self.window_lengthscales is not None:
            return self.rows(upsampling, 0, self.domain_shape[0] * upsampling)
        with self._lock:
            if upsampling not in self._maps:
                self._maps[upsampling] = self._drawn_maps(upsampling)
            return self._maps[upsampling]

    def rows(self, upsampling: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, windows' variance and its standard error (or bound) at rows ``[start, stop)`` of the domain grid.

        The first axis of the ``u``-times denser domain grid; ``(P, stop − start,
        *fine[1:], T)`` each, on the model's device.  Memory grows with the rows and the
        mean's halo (:func:`~hyperspy_gp.gp.toeplitz.lattice_product_rows`), not with the
        grid: the variance's parts are computed once per grid
        (:class:`~hyperspy_gp.gp.window_variance.WindowedVariance`) and only placed here.
        """
        if self.window_lengthscales is None:
            raise ValueError("The variance is drawn from whole maps: use upsampled_maps.")
        kernel = self.model.kernel
        tail = [n * upsampling for n in self.domain_shape[1:]]
        with torch.no_grad():
            mean = lattice_product_rows(kernel, self.lengthscale, self.mean_weights, self.origin, self.domain_shape,
                                        upsampling, (start, stop), self.halo)
            parts = self._windowed_variance(upsampling)
            variance = parts.rows(start, stop, tail)
        mean, variance = mean.movedim(1, -1), variance.movedim(1, -1)
        # Exact, the standard error is one number per map: a view of it, not a copy per pixel.
        floor = parts.floor.to(variance.device, variance.dtype).reshape(parts.floor.shape[0], *([1] * len(tail)), 1,
                                                                        -1)
        if self.variance_is_exact:
            return mean, variance, floor.expand_as(variance)
        bounds = window_variance.error_bounds(self.lengthscale, self.mask, kernel.points,
                                              self._domain_coordinates(upsampling), parts.plan, (start, stop))
        return mean, variance, variance * bounds.to(variance.device, variance.dtype)[..., None] + floor

    def _windowed_variance(self, upsampling: int) -> window_variance.WindowedVariance:
        """The windows' variance parts on the ``u``-times denser domain grid (computed once, cached)."""
        with self._lock:
            if upsampling not in self._windowed:
                self._windowed[upsampling] = self._prepare_windowed_variance(upsampling)
            return self._windowed[upsampling]

    def _drawn_maps(self, upsampling: int):
        """Mean, Monte-Carlo variance and its standard error on the whole domain grid, ``(P, *fine, T)`` each."""
        kernel: GridKernel = self.model.kernel
        fine_shape = tuple(n * upsampling for n in self.domain_shape)
        with torch.no_grad():
            mean = lattice_product_rows(kernel, self.lengthscale, self.mean_weights, self.origin, self.domain_shape,
                                        upsampling, (0, fine_shape[0]), self.halo)
            # The mean's products are exact Toeplitz products; the draws embed the kernel
            # until it has decayed, so that their circulant stays PSD.
            fft_shape = self._embedding(upsampling)
            separable_kernel = GridKernel(kernel.grid_shape, "separable", dtype=kernel.dtype, device=kernel.device)
            sampling = [ToeplitzKernel(k, self.lengthscale, fine_shape, 1.0 / upsampling, fft_shape)
                        for k in (kernel, separable_kernel)]
            exact_separable = self._separable.predict(self._domain_coordinates(upsampling))[1].movedim(-1, 1)
            variance, error = self._estimate_variance(sampling, upsampling, fine_shape, exact_separable)
        as_maps_last = [x.movedim(1, -1).cpu() for x in (mean, variance, error)]
        return tuple(as_maps_last)

    def _embedding(self, upsampling: int) -> list[int]:
        """The torus of the draws and the periodic twin (:func:`_embedding_shape`)."""
        fine_shape = tuple(n * upsampling for n in self.domain_shape)
        reach = self.lengthscale.max(0).values * upsampling * EMBEDDING_LENGTHSCALES
        return _embedding_shape(fine_shape, reach.tolist(), upsampling)

    def _domain_coordinates(self, upsampling: int) -> list[torch.Tensor]:
        """The ``u``-times denser domain grid in pixels of the training grid, one 1-D tensor per axis."""
        return [self.model.kernel.axis_coordinates(n, upsampling) - o for n, o in zip(self.domain_shape, self.origin)]

    def _prepare_windowed_variance(self, upsampling: int) -> window_variance.WindowedVariance:
        """The periodic twin's variance per coset, its increase at the twin points and the windows' variances.

        See :mod:`~hyperspy_gp.gp.window_variance`.  Also the rounding floor of the exact
        parts per map (:data:`ROUNDING_FLOOR`) and the
        :class:`~hyperspy_gp.gp.window_variance.VariancePlan` that served.
        """
        kernel = self.model.kernel
        fine_shape = tuple(n * upsampling for n in self.domain_shape)
        coords = self._domain_coordinates(upsampling)
        with torch.no_grad():
            embedding = ToeplitzKernel(kernel, self.lengthscale, fine_shape, 1.0 / upsampling,
                                       self._embedding(upsampling))
            sqrt_spec, clipped = _circulant_sqrt_spectrum(embedding)
            del embedding
            periodic = PeriodicTwin(sqrt_spec.pow(2), self._embedding(upsampling), upsampling, self.task_covariance,
                                    self.noise)
            del sqrt_spec
            # A clipped spectrum (length scales beyond the scan) leaves the twin's variance
            # biased: then every core is a window (such scans are a margin wide anyway).
            everywhere = clipped > CLIPPED_SPECTRUM_TOLERANCE
            plan = None if everywhere else self._plans.get(upsampling)
            if plan is None:
                plan = window_variance.plan_exact_variance(kernel, self.lengthscale, self.mask, coords, everywhere,
                                                           self.window_lengthscales)
            windows, points = plan.windows, plan.twin_points
            covered = not any(isinstance(w, window_variance.EdgeWindow) for w in windows) and \
                sum(math.prod(len(t) for t in w.test) for w in windows) == math.prod(fine_shape)
            per_coset = None if covered else periodic.coset_variance()
            missing = torch.nonzero(self.mask == 0) + torch.tensor(self.origin, device=self.mask.device)
            increase = periodic.missing_increase(missing, points) if len(points) else \
                self.noise.new_zeros(*self.task_covariance.shape[:2], 0)
            solved = window_variance.solve_windows(kernel, self.lengthscale, self.task_covariance, self.noise, windows,
                                                   coords, self.noise.device)
            floor = ROUNDING_FLOOR * torch.finfo(self.noise.dtype).eps * periodic.prior_variance()
        return window_variance.WindowedVariance(per_coset, points, increase, solved, plan, floor)

    def _estimate_variance(self, sampling, upsampling: int, fine_shape, exact_separable):
        r"""The variance and its standard error on the upsampled grid, ``(P, T, *fine)`` each.

        ``sampling`` holds the model's and the separable kernel embedded on the torus of
        the draws; ``exact_separable`` is the separable model's exact variance.

        The periodic twin (:class:`~hyperspy_gp.gp.periodic_twin.PeriodicTwin`) sees a
        superset of the model's data, so per draw the model's error is the twin's plus a
        part ``h`` independent of it, and ``var = v_per + E[h²]`` with ``v_per`` exact.
        The same holds for the separable model and its own periodic twin, with a gap
        ``g`` whose ``E[g²] = v_sep − v_sep,per`` is exact; ``(h, g)`` is a Gaussian pair,
        and ``E[h²]`` is estimated by regression on ``g`` (:meth:`_Moments.estimate`).
        Both gaps are ``Σ_m k(x* − u m) (w_twin − w_model)(m)`` over the lattice of the
        torus: the draw at the test points cancels, so it is drawn on the lattice only,
        and the gaps are convolutions on the lattice, one coset of the test points at a
        time (:meth:`~hyperspy_gp.gp.periodic_twin.PeriodicTwin.fitted_coset`), summed
        into the moments there: no array has the torus' size per draw, nor the
        upsampled grid's.
        """
        fine = sampling[0]
        sqrt_spec, clipped = _circulant_sqrt_spectrum(fine)
        sqrt_spec_sep, clipped_sep = _circulant_sqrt_spectrum(sampling[1])
        if max(clipped, clipped_sep) > CLIPPED_SPECTRUM_TOLERANCE:
            warnings.warn(
                f"The circulant embedding of the prior clipped {max(clipped, clipped_sep):.2g} of its spectrum "
                "(length scales long relative to the scan): the Monte-Carlo variance may be biased beyond its "
                "reported standard error. Consider an upper length-scale bound or kernel='separable'.",
                UserWarning, stacklevel=2,
            )
        periodic, periodic_sep = (PeriodicTwin(spectrum.pow(2), fine.fft_shape, upsampling, self.task_covariance,
                                               self.noise) for spectrum in (sqrt_spec, sqrt_spec_sep))
        twins = (periodic, periodic_sep)
        task_sqrt = _task_sqrt(self.task_covariance).to(sqrt_spec.device)
        noise_sd = self.noise.sqrt()
        p, t = self.task_covariance.shape[:2]
        d, dims = len(fine_shape), tuple(range(-len(fine_shape), 0))
        training = tuple(slice(o, o + n) for o, n in zip(self.origin, self.model.kernel.grid_shape))
        # The draws' kernel at each coset of the lattice, per twin (the same for every draw).
        kernel_spectra = {offset: [twin.coset_kernel_spectrum(offset) for twin in twins]
                          for offset in itertools.product(range(upsampling), repeat=d)}
        # The draws' covariance on the lattice of the torus: circulant there, its
        # spectrum the twins' eigenvalues (the embedding's folded onto the lattice).
        lattice_spectra = [twin.eigenvalues.sqrt() for twin in twins]
        per_draw = _bytes_per_draw(p, t, periodic.coarse_shape, self.domain_shape)
        batch = max(1, 4 * DEFAULT_CHUNK_BYTES // per_draw)
        generator = np.random.default_rng(self.seed)
        moments = _Moments(self.n_samples, (p, t, *fine_shape), sqrt_spec)
        for start in range(0, self.n_samples, batch):
            size = min(batch, self.n_samples - start)
            noise = _standard_normal(generator, (p, size, t, *periodic.coarse_shape), sqrt_spec)
            noise = noise * noise_sd.reshape(p, 1, t, *([1] * d))
            draws = _lattice_prior_draws(task_sqrt, lattice_spectra, periodic.coarse_shape, (p, size, t), generator)
            spectra = []
            for kernel, (solve, mask, twin) in enumerate(zip((self._solve_draws, self._separable_inverse),
                                                             (self.mask, self._twin_mask), twins)):
                on_lattice, draws[kernel] = draws[kernel], None
                # The errors f* − E[f* | ·] share the draw f*, which cancels in their gap:
                # h = Σ k(x* − x_m) (w_twin − w_model)(m), the model's weights at its pixels.
                weights = twin.weights(on_lattice, noise)
                observed = (on_lattice[(..., *training)] + noise[(..., *training)]) * mask
                del on_lattice
                weights[(..., *training)] -= self._operator.mix(solve(observed))
                spectra.append(torch.fft.rfftn(weights, dim=dims))
                del weights
            del noise
            for offset, kernels in kernel_spectra.items():  # both gaps at the test points of one coset at a time
                gaps = [twin.fitted_coset(spectrum, kernel, self.domain_shape)
                        for twin, spectrum, kernel in zip(twins, spectra, kernels)]
                moments.add(*gaps, at=(slice(None), slice(None), *(slice(c, None, upsampling) for c in offset)))
        # E[g²] = v_sep − v_sep,per, exactly; then var = v_per + E[h²].
        separable_gap = exact_separable.sub_(tile_cosets(periodic_sep.coset_variance(), fine_shape))
        prior = periodic.prior_variance()
        rounding = (ROUNDING_FLOOR * torch.finfo(prior.dtype).eps * prior).reshape(p, t, *([1] * d))
        gap, error = moments.estimate(separable_gap, rounding)  # (v_sep and v_sep,per round alike)
        del separable_gap
        gap.add_(tile_cosets(periodic.coset_variance(), fine_shape))
        return gap, error.pow_(2).add_(rounding.pow(2)).sqrt_()


#: Arrays of one row of a chunk, per map, for :meth:`IterativePosterior.default_chunk_rows`:
#: the mean's slab and product, the FFTs' spectra (twice the slab, complex), the
#: variance, its bound and the float64 copies a dask task returns.
CHUNK_ROW_ARRAYS = 10


#: The standard error's floor, in units of the prior variance times the float's epsilon:
#: the exact parts are the prior minus what the data explain, which leaves rounding
#: errors of that order where the data explain nearly everything.  Measured on 40 × 36
#: maps at 2× (dense reference), more than a few length scales inside the scan: a
#: median of 9 and at most a few hundred.
ROUNDING_FLOOR = 100.0


def _standard_normal(generator: np.random.Generator, shape, like: torch.Tensor) -> torch.Tensor:
    """White noise of ``shape`` with the dtype and device of ``like``.

    NumPy's generator (ziggurat) draws these 2.5× faster than ``torch.randn`` on the CPU,
    and the draws can number 10⁷ to 10⁸ (64 draws of a lattice of up to 2²¹ / u^d points per map).
    """
    dtype = np.float32 if like.dtype == torch.float32 else np.float64
    return torch.from_numpy(generator.standard_normal(shape, dtype=dtype)).to(like.device)


def _bytes_per_draw(n_models: int, n_tasks: int, coarse_shape, domain_shape) -> int:
    """Memory of one draw of the variance estimate, generously.

    Per map, arrays of the torus' coarse lattice: the white noise, the draws of both
    kernels and their mixing, each kernel's weights with the temporaries of the twin's
    solve, and both weights' spectra; and, per coset, the spectra's product, the
    pruned inverse's intermediate and both gaps on the domain with their product.
    """
    per_map = 14 * math.prod(coarse_shape) + 4 * math.prod(domain_shape)
    return 8 * n_models * n_tasks * per_map


#: Draws from which the estimate regresses on the separable model's gap; below, it is the
#: plain mean of the draws.  With fewer draws the coefficients are too noisy: on 9 × 8 × 2
#: maps, when the estimate regressed the squared error itself on two twins, 4 draws gave
#: 13 of 576 pixels a variance clipped to 0 and a standard error that hid it; 8 or more
#: gave none.  (The gap's estimate never falls below the periodic twin's variance.)
DRAWS_FOR_REGRESSION = 8


class _Moments:
    """Running second moments of the gaps ``h`` and ``g``, and the estimate of ``E[h²]`` from them.

    ``(h, g)`` is exactly a zero-mean Gaussian pair at every pixel (both are linear in
    the draws), so its three second moments are sufficient, and ``E[g²]`` is known.
    """

    def __init__(self, n_samples: int, shape: Sequence[int], like: torch.Tensor) -> None:
        self.n_samples = n_samples
        self.regress = n_samples >= DRAWS_FOR_REGRESSION
        names = ("hh", "gg", "hg") if self.regress else ("hh",)
        #: Sums over the draws, ``(P, T, *fine)`` each.
        self.sums = {name: like.new_zeros(shape) for name in names}

    def add(self, h: torch.Tensor, g: torch.Tensor, at: tuple = (...,)) -> None:
        """Add draws ``(P, R, T, *points)`` of both gaps at the points ``at`` of the sums."""
        pairs = {"hh": (h, h), "gg": (g, g), "hg": (h, g)}
        for name, total in self.sums.items():  # one product at a time
            x, y = pairs[name]
            total[at] += (x * y).sum(1)

    def estimate(self, known_gg: torch.Tensor, known_error: torch.Tensor | float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The estimate of ``E[h²]`` and its standard error (consumes the sums).

        With ``β = S_hg / S_gg`` (``S`` the mean products), the residual ``r = h − β g``
        and ``E[g²]`` known to within ``δ`` (``known_error``, its rounding),

        .. math::  \hat σ_h^2 = S_{rr} + β^2 E[g^2],
           \qquad \mathrm{se}^2 = 2 \hat σ_r^2 (\hat σ_r^2 + 2 β^2 E[g^2]) / S + (β^2 δ)^2,

        the regression estimator with a known control variance, never negative; without
        ``δ`` its standard error equals ``2 σ_h⁴ (1 − ρ⁴) / S`` for the pair's
        correlation ``ρ``.  Where ``g`` is down at rounding (more than a few length
        scales inside the scan, the separable model's solves being exact) ``β`` is a
        ratio of rounding errors and can reach 10⁵, and ``β² δ`` swamps the estimate
        (measured on 256² × 6 maps at 3 px, 2×: up to 0.6 % of the variance there,
        with a standard error of 3·10⁻¹¹ reported).  So each pixel takes the estimator with the smaller
        standard error, this one or the plain mean ``S_hh``, ``S_hh √(2/S)``, which is
        all there is without the regression.  With ``β² E[g²] = ρ² σ_h²`` the ratio of
        their variances is ``1 − ρ⁴ + (S/2) ρ⁴ (δ / E[g²])²``: the regression wins iff
        ``δ / E[g²] < √(2/S)``, whatever ``ρ``, so the choice is made on those known
        numbers.  Choosing on the estimated errors instead favoured the plain mean where
        its own draws happened to come out small, and so its under-estimates: against
        the exact windows at 3 px, 2×, the pixels beyond 4 standard errors went from 148
        to 123 (64² × 3), 356 to 299 (128² × 6) and 1087 to 916 (256² × 6).  What is
        left of the heavy tail is the plain mean's own: with its standard error
        estimated from the same 64 draws, 0.33 % of its z-scores fall beyond 4.
        """
        mean = self.sums
        count = self.n_samples
        for total in mean.values():
            total /= count
        plain = mean.pop("hh")
        plain_error = plain * math.sqrt(2.0 / count)
        if not self.regress:
            return plain, plain_error
        gg = mean.pop("gg").clamp_min_(torch.finfo(plain.dtype).tiny)
        beta_squared = mean.pop("hg").div_(gg).pow_(2)
        residual = (plain - beta_squared * gg).clamp_min_(0.0)  # S_rr
        del gg
        explained = beta_squared * known_gg.clamp_min(0.0)  # β² E[g²]
        spread = residual * (count / (count - 1))  # σ̂_r², one coefficient fitted
        error = spread.mul_(spread + 2 * explained).mul_(2.0 / count)
        error.add_(beta_squared.mul_(known_error).pow_(2)).sqrt_()
        del beta_squared
        regressed = residual.add_(explained)
        # The regression's standard error is the smaller iff δ / E[g²] < √(2/S), whatever ρ:
        # decided on those known numbers, not on the draws' own (noisy) errors.
        use = (known_gg * math.sqrt(2.0 / count) > known_error) & torch.isfinite(error)
        return regressed.where(use, plain), error.where(use, plain_error)


def _lattice_prior_draws(task_sqrt: torch.Tensor, spectra, coarse_shape, shape, generator) -> list[torch.Tensor]:
    """Prior draws of ``B ⊗ K`` at the coarse lattice of the torus for each kernel, from the same white noise.

    The draws are needed at the coarse lattice only, every ``u``-th point of the torus
    (the training pixels and the periodic twin's data): both posterior errors share the
    draw at the test points, which cancels in the gap between them.  On that lattice
    the kernel's covariance is circulant, its spectrum the embedding's folded onto it
    (``√`` in ``spectra``, ``(P, *rfft of coarse_shape)``), so the white noise is drawn
    there, ``u^d`` times less of it than on the torus.  The maps share the kernel, so the
    noise is mixed first (``R Rᵀ = B``), then filtered one map at a time.  Each kernel's
    draws are exact; drawn from the same noise, the two are coherent at every frequency
    (the control variate's correlation).

    Returns
    -------
    list
        Per kernel, ``(P, R, T, *coarse_shape)``.
    """
    p, size, t = shape
    first = spectra[0]
    dims = tuple(range(-len(coarse_shape), 0))
    mixed = first.new_zeros(p, size, t, *coarse_shape)
    for task in range(t):
        white = _standard_normal(generator, (p, size, *coarse_shape), first)
        for out in range(t):
            mixed[:, :, out].add_(white * task_sqrt[:, out, task].reshape(p, 1, *([1] * len(dims))))
    del white
    draws = [first.new_empty(p, size, t, *coarse_shape) for _ in spectra]
    for task in range(t):
        spectrum = torch.fft.rfftn(mixed[:, :, task], dim=dims)
        for filter_, lattice in zip(spectra, draws):
            lattice[:, :, task] = torch.fft.irfftn(spectrum * filter_.unsqueeze(1), s=coarse_shape, dim=dims)
    return draws


def _separable_twin(model, targets: torch.Tensor, masked: bool) -> Posterior:
    """The exact posterior of the same model with the separable kernel, on the observed pixels if ``masked``."""
    from hyperspy_gp.gp.model import GridICMModel
    from hyperspy_gp.gp.schur import SchurPosterior

    kernel = model.kernel
    twin = GridICMModel(GridKernel(kernel.grid_shape, "separable", dtype=kernel.dtype, device=kernel.device),
                        model.n_models, model.n_tasks, rank=model.rank, isotropic=model.isotropic,
                        lengthscale_bounds=model.lengthscale_bounds, observed=model.observed if masked else None,
                        masked_solver="schur")
    twin.load_state_dict(model.state_dict())
    return SchurPosterior(twin, targets) if masked else GridPosterior(twin, targets)
