r"""Prediction after a fit by the Schur complement by CG (:mod:`~hyperspy_gp.gp.schur_iterative`).

The mean is the full-grid posterior mean of the completed maps ``ȳ(z*)`` (exact).  The
variance is the full-grid variance plus the increase ``g(x*)ᵀ C^{-1} g(x*)`` with
``g(x*) = (Σ^{-1} c(x*))_M``:

- exact, streamed over the whitened maps and blocks of columns of the factorised
  complement (:func:`~hyperspy_gp.gp.schur.streamed_increase`), where that is
  affordable on the test grid (:func:`~hyperspy_gp.memory.streamed_increase_fits`);
- exact (to 1e-6 relative), window by window (:mod:`~hyperspy_gp.gp.schur_windows`),
  where that is affordable and cheaper;
- where neither is affordable, window by window with a shorter margin, within its
  stated bound (:data:`~hyperspy_gp.gp.schur_windows.MARGIN_ERROR_BOUNDS`), where that is;
- otherwise estimated from ``S`` draws ``v_s ~ N(0, C^{-1})`` (``v = C^{-1} w`` with
  ``w = (Σ^{-1/2} ε)_M``, exact draws of ``N(0, C)``), as the mean of ``(g(x*)ᵀ v_s)^2``,
  a structured prediction per draw, with its standard error per pixel.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from hyperspy_gp.gp import schur_windows
from hyperspy_gp.gp.iterative import ESTIMATE_CG_TOLERANCE
from hyperspy_gp.gp.prediction import DEFAULT_CHUNK_BYTES, GridPosterior
from hyperspy_gp.gp.schur_iterative import MaskedOperator, SchurCGSolve
from hyperspy_gp.gp.tensor import kron_dot
from hyperspy_gp.memory import VARIANCE_DRAWS

#: Draws solved together (as many vectors as the likelihood's CG holds).
DRAWS_PER_SOLVE = 16
#: Draws of the Monte-Carlo variance increase at the missing pixels (the memory
#: estimate of :mod:`hyperspy_gp.memory` assumes the same unless told otherwise).
DEFAULT_VARIANCE_SAMPLES = VARIANCE_DRAWS

_logger = logging.getLogger(__name__)


def _exact_increase_plan(model, test_coords: Sequence[torch.Tensor]) -> str | schur_windows.WindowPlan:
    """How the variance increase on ``test_coords`` is computed: ``"streamed"``, windows or ``"drawn"``.

    The exact increase of the whole grid is streamed where that is affordable
    (:func:`~hyperspy_gp.memory.streamed_increase_fits`); the windows of
    :mod:`~hyperspy_gp.gp.schur_windows` serve where they are affordable and cheaper
    (:func:`~hyperspy_gp.gp.schur_windows.windows_fit`).  Where neither is, windows of
    shorter margins are tried in turn (:data:`~hyperspy_gp.gp.schur_windows.MARGIN_ERROR_BOUNDS`,
    within their stated bound); otherwise the increase is drawn.
    """
    from hyperspy_gp.memory import streamed_increase_cost, streamed_increase_fits

    n_missing, n_test = int((~model.observed).sum()), math.prod(len(c) for c in test_coords)
    shape, tasks, models = model.kernel.factor_shape, model.n_tasks, model.n_models
    device = str(model.noise.device)
    streams = streamed_increase_fits(shape, n_missing, tasks, models, n_test, device=device)
    cost = streamed_increase_cost(shape, n_missing, tasks, models, n_test)
    plan = "streamed" if streams else "drawn"
    if model.kernel.kind == "separable":  # (windows need the per-axis factors)
        # The exact windows where cheaper than the streamed increase; shorter ones only instead of the draws.
        margins = list(schur_windows.MARGIN_ERROR_BOUNDS)[: 1 if streams else None]
        for lengthscales in margins:
            windows = schur_windows.cut_windows(model.kernel.points, model.missing_index, test_coords,
                                                schur_windows.margins(model.lengthscale, lengthscales))
            windowed_cost = schur_windows.windowed_cost(windows, tasks, models)
            if schur_windows.windows_fit(windows, tasks, models, device) and (not streams or windowed_cost < cost):
                plan, cost = schur_windows.WindowPlan(windows, lengthscales), windowed_cost
                break
    if plan == "streamed":
        described = "exact, streamed"
    elif plan == "drawn":
        described = "Monte-Carlo, the exact one beyond its limits"
    else:
        exact = plan.lengthscales == schur_windows.WINDOW_LENGTHSCALES
        bound = "exact" if exact else f"within {schur_windows.MARGIN_ERROR_BOUNDS[plan.lengthscales]:g} relative"
        described = f"{bound}, in {len(plan.windows)} windows of {plan.lengthscales:g} length scales"
    _logger.info("Variance after the fit by CG: %s (%d missing pixels, %.2g multiply-adds for the exact one)",
                 described, n_missing, cost)
    return plan


class SchurCGPosterior(GridPosterior):
    """Posterior of a model fitted with many missing pixels: exact mean, exact or Monte-Carlo variance increase.

    Given the test grid it will predict, and where that is affordable
    (:func:`~hyperspy_gp.memory.streamed_increase_fits`), the variance increase is the
    exact one, streamed over the whitened maps and blocks of columns of the factorised
    complement (:func:`~hyperspy_gp.gp.schur.streamed_increase`), or computed window by
    window where that is affordable and cheaper (:mod:`~hyperspy_gp.gp.schur_windows`);
    otherwise it is the mean of ``n_samples`` draws, with a standard error.

    Parameters
    ----------
    model, targets
        As for :class:`~hyperspy_gp.gp.schur.SchurPosterior`.
    n_samples
        Draws of the variance increase.
    seed
        Seed of the draws (predictions are deterministic).
    test_coords
        The test grid of the exact variance (one 1-D tensor per axis); such a posterior
        predicts on that grid only (any chunk of its rows).
    """

    variance_is_exact = False

    def __init__(self, model, targets: torch.Tensor, n_samples: int = DEFAULT_VARIANCE_SAMPLES,
                 seed: int = 0, test_coords: Sequence[torch.Tensor] | None = None) -> None:
        self.n_samples = int(n_samples)
        self.exact_grid = None  # (test coordinates, exact increase (P, *test, T)) on a given test grid
        with torch.no_grad():
            factors = model.kernel.factors(model.lengthscale)
            schur = SchurCGSolve(model.as_factor_layout(targets), model.task_covariance, model.noise, factors,
                                 model.missing_index, coarse=model.coarse_lattice)
            op = schur.operator
            completed = schur.completed.reshape(targets.shape)
        plan = "drawn" if test_coords is None else _exact_increase_plan(model, test_coords)
        if plan != "drawn":
            self._exact_increase(model, op, test_coords, plan)
            super().__init__(model, completed, solve=op.solve.with_targets(schur.completed))
            self.jitter = torch.maximum(self.jitter, schur.jitter)
            return
        with torch.no_grad():
            # w ~ N(0, C): Σ⁻¹ = F Fᵀ with F = Q chol(S_j)⁻ᵀ, w = (F ε)_M; v = C⁻¹ w ~ N(0, C⁻¹).
            generator = torch.Generator().manual_seed(seed)
            chol = op.solve.cholesky  # (P, *fg, T, T)
            eps = torch.randn((*chol.shape[:-1], self.n_samples), generator=generator, dtype=chol.dtype)
            whitened = torch.linalg.solve_triangular(chol.transpose(-1, -2), eps.to(chol.device), upper=True)
            w = op.gather(kron_dot(whitened, op.eigenvectors))
            # A batch of draws at a time: CG's vectors and the grid temporaries of each
            # product stay the size of the likelihood's.
            batch = DRAWS_PER_SOLVE
            v = torch.cat([op.unwhiten_t(op.whitened_cg(op.whiten(w[:, i : i + batch]), schur.preconditioner,
                                                        ESTIMATE_CG_TOLERANCE).solution)
                           for i in range(0, self.n_samples, batch)], 1)
            # Weights of the structured "mean" of each draw: B M_j Qᵀ E_M v, (P, *fg, T, S).
            rotated = kron_dot(op.scatter(v), [q.transpose(-1, -2) for q in op.eigenvectors])
            b = model.task_covariance.reshape(chol.shape[0], *([1] * (chol.dim() - 3)), *chol.shape[-2:])
            self.draw_weights = b @ (op.inverse_blocks @ rotated)
        super().__init__(model, completed, solve=op.solve.with_targets(schur.completed))
        self.jitter = torch.maximum(self.jitter, schur.jitter)

    def _exact_increase(self, model, op: MaskedOperator, test_coords: Sequence[torch.Tensor], plan) -> None:
        """The exact variance increase on ``test_coords``: streamed over the whole grid, or window by window.

        See :func:`~hyperspy_gp.gp.schur.streamed_increase` and
        :func:`~hyperspy_gp.gp.schur_windows.windowed_increase`.
        """
        from hyperspy_gp.gp.schur import streamed_increase
        from hyperspy_gp.gp.schur_windows import windowed_increase

        with torch.no_grad():
            if plan == "streamed":
                cross = model.kernel.cross_factors(model.lengthscale, test_coords)
                rotated = [k @ q for k, q in zip(cross, op.eigenvectors)]
                increase = streamed_increase(op.solve, model.task_covariance, model.missing_index,
                                             rotated)
            else:
                increase = windowed_increase(model.kernel, model.lengthscale.detach(), model.task_covariance.detach(),
                                             model.noise.detach(), plan.windows, test_coords)
                self.window_lengthscales = plan.lengthscales
        shape = (increase.shape[0], *(len(c) for c in test_coords), increase.shape[-1])
        self.exact_grid = ([c.detach().cpu() for c in test_coords], increase.reshape(shape))
        self.n_samples, self.draw_weights = 0, None
        self.variance_is_exact = self.window_lengthscales in (None, schur_windows.WINDOW_LENGTHSCALES)
        if not self.variance_is_exact:
            self.variance_error_bound = schur_windows.MARGIN_ERROR_BOUNDS[self.window_lengthscales]

    def _exact_rows(self, test_coords: Sequence[torch.Tensor]) -> torch.Tensor:
        """The exact increase at ``test_coords``: a chunk of rows of the test grid given at construction."""
        grid, increase = self.exact_grid
        rows = test_coords[0].detach().cpu()
        start = int(torch.searchsorted(grid[0], rows[:1])) if len(rows) else 0
        same = start + len(rows) <= len(grid[0]) and torch.equal(grid[0][start : start + len(rows)], rows) and \
            all(torch.equal(c.detach().cpu(), g) for c, g in zip(test_coords[1:], grid[1:]))
        if not same:
            raise ValueError("This posterior's exact variance covers the test grid it was built for (test_coords of "
                             "make_posterior); predict chunks of that grid's rows, or build it for the new grid.")
        return increase[:, start : start + len(rows)]

    def _increase_draws(self, test_coords: Sequence[torch.Tensor]) -> torch.Tensor:
        """``g(x*)ᵀ v_s`` for every test point and draw, ``(P, *test, T, S)``."""
        cross = self.model.kernel.cross_factors(self.lengthscale, test_coords)
        rotated = [k @ q for k, q in zip(cross, self.eigenvectors)]
        out = kron_dot(self.draw_weights, rotated)
        p, t, s = out.shape[0], out.shape[-2], out.shape[-1]
        return out.reshape(p, *(len(c) for c in test_coords), t, s)

    def predict(self, test_coords: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and variance ``(P, m_1, ..., m_d, T)`` on the grid of ``test_coords``."""
        if self.exact_grid is None:
            return self.predict_with_standard_error(test_coords)[:2]
        mean, variance = super().predict(test_coords)
        return mean, variance + self._exact_rows(test_coords).to(variance.device)

    def predict_with_standard_error(
        self, test_coords: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, Monte-Carlo variance and its standard error from one set of draws, ``(P, m_1, ..., m_d, T)`` each.

        With windows of a shorter margin, the windows' variance and its bound instead.
        """
        self._require_drawn_variance()
        if self.exact_grid is not None:
            mean, variance = self.predict(test_coords)
            return mean, variance, variance * self.variance_error_bound
        mean, variance = super().predict(test_coords)
        increase, error = self._drawn_increase(test_coords)
        return mean, variance + increase, error

    def _drawn_increase(self, test_coords: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The Monte-Carlo variance increase at ``test_coords`` and its standard error."""
        with torch.no_grad():
            spread, increase = torch.var_mean(self._increase_draws(test_coords).pow(2), dim=-1)
        return increase, (spread / self.n_samples).sqrt()

    def variance_standard_error(self, test_coords: Sequence[torch.Tensor]) -> torch.Tensor:
        """Standard error of the Monte-Carlo variance of each test point, ``(P, m_1, ..., m_d, T)`` (or its bound)."""
        self._require_drawn_variance()
        if self.exact_grid is not None:
            return self.predict_with_standard_error(test_coords)[2]
        rows = self.default_chunk_rows(test_coords)
        parts = []
        for start in range(0, len(test_coords[0]), rows):
            chunk = [test_coords[0][start : start + rows], *test_coords[1:]]
            parts.append(self._drawn_increase(chunk)[1])
        return torch.cat(parts, dim=1)

    def default_chunk_rows(self, test_coords: Sequence[torch.Tensor]) -> int:
        """Rows per chunk keeping the draws' predictions under the chunk budget.

        The budget is :data:`~hyperspy_gp.gp.prediction.DEFAULT_CHUNK_BYTES`.
        """
        rows = super().default_chunk_rows(test_coords)
        if self.draw_weights is None:  # the exact increase, computed already
            return rows
        p, *fg, t, s = self.draw_weights.shape
        per_row = max(math.prod(len(c) for c in test_coords[1:]), math.prod(fg[1:])) * p * t * s * 8 * 3
        return max(1, min(rows, DEFAULT_CHUNK_BYTES // max(per_row, 1)))
