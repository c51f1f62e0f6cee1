r"""Predictive mean and variance of the grid ICM model on a (denser) test grid.

For a test point ``x*`` let ``u_j(x*) = (Qᵀ k(X, x*))_j`` be its cross-covariance
rotated into the training eigenbasis.  With the blocks ``M_j = S_j^{-1}`` of
:mod:`~hyperspy_gp.gp.likelihood`, the latent (noise-free) posterior of map ``t`` is

.. math::

    μ_t(x*) = \sum_j u_j(x*) (B α̃_j)_t, \qquad
    \mathrm{var}_t(x*) = B_{tt} − \sum_j u_j(x*)^2 (B M_j B)_{tt}.

For a separable kernel ``u_j(x*) = Π_a U_a[i_a, j_a]`` with ``U_a = K*_a Q_a``
(``m_a × n_a``), so both sums are Kronecker mode products and the variance of every
test pixel is exact without forming an ``(n_test × n_train)`` matrix.  The test grid
is processed in chunks of rows of its first axis, so peak memory is bounded by the
chunk.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from hyperspy_gp.gp.likelihood import GridICMSolve, solve_grid_icm, whitened_variance_reduction
from hyperspy_gp.gp.model import GridICMModel
from hyperspy_gp.gp.tensor import kron_dot
from hyperspy_gp.memory import CHUNK_BYTES, VARIANCE_DRAWS, release_freed_memory, releases_freed_memory

#: Memory budget (bytes) of the largest temporary of one prediction chunk (the memory
#: estimate of :mod:`hyperspy_gp.memory` assumes the same).
DEFAULT_CHUNK_BYTES = CHUNK_BYTES


class Posterior:
    """Chunked and dask prediction shared by the structured and the dense posteriors.

    Subclasses define ``predict(test_coords)``, ``default_chunk_rows(test_coords)`` and
    ``mean_weights`` (whose first dimension is the batch ``P``, last the maps ``T``)
    and ``jitter`` (``(P,)``, the diagonal added to factorise the training covariance,
    see :mod:`~hyperspy_gp.gp.cholesky`).  Posteriors whose variance is a Monte-Carlo
    estimate (or an approximation within a stated bound) set :attr:`variance_is_exact`
    to false and define ``variance_standard_error(test_coords)`` and ``n_samples``
    (``0`` for an approximation).
    """

    #: Whether :meth:`predict` returns the exact variance (else an estimate with a standard error, or a bound).
    variance_is_exact = True
    #: Margin of the windows that serve the variance, in length scales (``None``: no windows).
    window_lengthscales: float | None = None
    #: Bound on the relative error of a variance by windows shorter than the exact ones; ``0``: exact or drawn.
    variance_error_bound = 0.0

    def predict_in_chunks(
        self, test_coords: Sequence[torch.Tensor], chunk_rows: int | None = None
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Yield ``(rows, mean, variance)`` for consecutive rows of the first test axis."""
        n_rows = len(test_coords[0])
        if chunk_rows is None:
            chunk_rows = self.default_chunk_rows(test_coords)
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n_rows))
            mean, variance = self.predict([test_coords[0][rows], *test_coords[1:]])
            yield rows, mean, variance

    def predict_with_standard_error(
        self, test_coords: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, Monte-Carlo variance and its standard error, ``(P, m_1, ..., m_d, T)`` each.

        Posteriors that draw their variance override it to compute the draws once for both.

        Raises
        ------
        ValueError
            For a posterior whose variance is exact (:attr:`variance_is_exact`).
        """
        self._require_drawn_variance()
        mean, variance = self.predict(test_coords)
        return mean, variance, self.variance_standard_error(test_coords)

    def _require_drawn_variance(self) -> None:
        if self.variance_is_exact:
            raise ValueError("This posterior's variance is exact: it has no standard error.")

    def predict_dask(self, test_coords: Sequence[torch.Tensor], chunk_rows: int | None = None,
                     standard_error: bool = False):
        """Mean and variance as dask arrays, one task per chunk of test rows.

        Each task computes its rows from the (small) posterior state only, so the same
        graph runs on the threaded scheduler or a ``dask.distributed`` cluster, and peak
        memory is bounded by the chunk, not by the output grid.

        Parameters
        ----------
        test_coords
            One 1-D tensor of test coordinates per axis (pixels of the training grid).
        chunk_rows
            Test rows per task; ``None``: :meth:`default_chunk_rows`.
        standard_error
            Also return the standard error of a Monte-Carlo variance, from the same
            draws (:meth:`predict_with_standard_error`).

        Returns
        -------
        mean, variance[, standard_error] : dask.array.Array
            ``(P, m_1, ..., m_d, T)`` each, float64 numpy chunks, standardised units.

        Raises
        ------
        ValueError
            For ``standard_error=True`` where the variance is exact.
        """
        import dask
        import dask.array as da

        if standard_error:
            self._require_drawn_variance()
        n_rows = len(test_coords[0])
        if chunk_rows is None:
            chunk_rows = self.default_chunk_rows(test_coords)
        coords = [c.detach().cpu() for c in test_coords]
        p, t = self.mean_weights.shape[0], self.model.n_tasks
        tail = tuple(len(c) for c in coords[1:])
        # One graph key for the posterior and the coordinates: a scheduler ships them
        # once per worker instead of pickling (and hashing) them into every task.
        state = dask.delayed((self, coords), traverse=False, name=f"gp-posterior-{uuid.uuid4().hex}")
        n_out = 3 if standard_error else 2
        outputs: list[list] = [[] for _ in range(n_out)]
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            task = dask.delayed(_predict_rows, pure=True, nout=n_out)(state, start, stop, standard_error)
            shape = (p, stop - start, *tail, t)
            for chunks, part in zip(outputs, task):
                chunks.append(da.from_delayed(part, shape=shape, dtype=np.float64))
        return tuple(da.concatenate(chunks, axis=1) for chunks in outputs)

    def predict_arrays(self, test_coords: Sequence[torch.Tensor], chunk_rows: int | None = None,
                       standard_error: bool = False) -> tuple[np.ndarray, ...]:
        """:meth:`predict_dask` computed into numpy arrays.

        With the threaded or synchronous scheduler the chunks go straight into the
        outputs (:func:`dask.array.store`), not through a concatenated copy, so peak
        memory is the outputs plus the chunks in flight (measured on the separable
        path, 512² × 12 maps at 4×: 1.15 GB above the baseline instead of 2.1 GB, for
        0.77 GB of outputs; 0.88–0.96 GB since each chunk releases the memory it freed,
        :func:`~hyperspy_gp.memory.release_freed_memory`).  Other schedulers
        (``dask.distributed``, processes) compute in their workers, and the chunks are
        gathered and concatenated.

        Returns
        -------
        mean, variance[, standard_error] : numpy.ndarray
            ``(P, m_1, ..., m_d, T)`` each, float64, standardised units.
        """
        import dask
        import dask.array as da
        import dask.local
        import dask.threaded
        from dask.base import get_scheduler

        arrays = self.predict_dask(test_coords, chunk_rows=chunk_rows, standard_error=standard_error)
        if get_scheduler() not in (None, dask.threaded.get, dask.local.get_sync):
            return dask.compute(*arrays)
        outputs = tuple(np.empty(a.shape, dtype=a.dtype) for a in arrays)
        da.store(arrays, outputs, lock=False)
        return outputs


class GridPosterior(Posterior):
    """The fitted model on a full grid, conditioned on its training maps.

    Parameters
    ----------
    model
        A fitted :class:`~hyperspy_gp.gp.model.GridICMModel`.
    targets
        ``(P, *grid, T)`` standardised training maps.
    solve
        The model's grid solve for ``targets``, where the caller has it already
        (:meth:`~hyperspy_gp.gp.likelihood.GridICMSolve.with_targets`); computed otherwise.
    """

    def __init__(self, model: GridICMModel, targets: torch.Tensor, solve: GridICMSolve | None = None) -> None:
        self.model = model
        with torch.no_grad():
            b = model.task_covariance
            if solve is None:
                solve = solve_grid_icm(
                    model.as_factor_layout(targets), b, model.noise, model.kernel.factors(model.lengthscale)
                )
            n_grid = solve.eigenvalues_grid.dim() - 1
            batch_b = b.reshape(b.shape[0], *([1] * n_grid), *b.shape[1:])
            # μ weights B α̃_j and variance weights (B M_j B)_tt, both (P, *factor_grid, T).
            self.mean_weights = (batch_b @ solve.rotated_weights.unsqueeze(-1)).squeeze(-1)
            self.variance_weights = _variance_weights(solve)
            self.prior_variance = torch.diagonal(b, dim1=-2, dim2=-1)  # k(x*, x*) = 1
            self.eigenvectors = solve.eigenvectors
            self.jitter = solve.jitter
            self.lengthscale = model.lengthscale.clone()

    def predict(self, test_coords: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and variance at the grid spanned by ``test_coords``.

        Returns
        -------
        mean, variance
            ``(P, m_1, ..., m_d, T)`` each, in standardised units.
        """
        kernel = self.model.kernel
        cross = kernel.cross_factors(self.lengthscale, test_coords)
        rotated = [k @ q for k, q in zip(cross, self.eigenvectors)]
        mean = kron_dot(self.mean_weights, rotated)
        reduction = kron_dot(self.variance_weights, [u * u for u in rotated])
        variance = (self.prior_variance.reshape(-1, *([1] * (mean.dim() - 2)), mean.shape[-1]) - reduction)
        shape = (mean.shape[0], *(len(t) for t in test_coords), mean.shape[-1])
        return mean.reshape(shape), variance.clamp_min(0.0).reshape(shape)

    def default_chunk_rows(self, test_coords: Sequence[torch.Tensor]) -> int:
        """Rows per chunk keeping the largest temporary under :data:`DEFAULT_CHUNK_BYTES`."""
        p, t = self.mean_weights.shape[0], self.mean_weights.shape[-1]
        per_row = math.prod(len(c) for c in test_coords[1:]) * p * max(t, 1) * 8 * 4
        if self.model.kernel.kind != "separable":
            per_row *= max(1, math.prod(self.model.kernel.grid_shape) // max(t, 1))
        return max(1, DEFAULT_CHUNK_BYTES // max(per_row, 1))


class ChunkPredictionError(RuntimeError):
    """Prediction failed in one dask task; the message names its rows, the cause is chained."""


def _predict_rows(state: tuple[Posterior, list[torch.Tensor]], start: int, stop: int, standard_error: bool = False):
    """One dask task: mean and variance (numpy) of test rows ``start:stop``, and the variance's standard error."""
    posterior, test_coords = state
    try:
        device = posterior.mean_weights.device
        rows = [test_coords[0][start:stop].to(device), *(c.to(device) for c in test_coords[1:])]
        out = posterior.predict_with_standard_error(rows) if standard_error else posterior.predict(rows)
        out = tuple(np.asarray(x.detach().cpu().numpy(), dtype=np.float64) for x in out)  # (no copy if float64)
        if releases_freed_memory():
            release_freed_memory()  # the chunk's temporaries, lest each thread's heap keep them
        return out
    except MemoryError:
        raise  # keep its type: callers free memory or choose smaller chunks
    except Exception as exc:  # (KeyboardInterrupt is not an Exception and passes through)
        n_rows = len(test_coords[0])
        raise ChunkPredictionError(
            f"GP prediction failed in the dask task for rows {start}:{stop} (of {n_rows}) of the "
            f"upsampled grid: {type(exc).__name__}: {exc}"
        ) from exc


def _variance_weights(solve: GridICMSolve) -> torch.Tensor:
    """``(B M_j B)_tt`` for every spatial eigenvalue, ``(P, *factor_grid, T)``, in the whitened task basis.

    With ``λ_j B + D = U diag(λ_j γ_k + 1) Uᵀ``, ``U = √D R``
    (:func:`~hyperspy_gp.gp.likelihood.whiten_tasks`, ``D`` the noise with any jitter
    the blocks got), ``(B M_j B)_tt = Σ_k U_tk² γ_k² / (λ_j γ_k + 1)``: a sum of positive
    terms, each to full precision.  Forming ``B M_j B`` from the inverse blocks instead
    loses ``cond(S_j)`` digits, which with a nearly rank-one ``B`` and little noise is
    the whole variance.  On 12 × 10 × 2 maps with ``cond(B) = 2.5·10⁶`` (length scales
    3 and 8 px) that gave 2.4e-7 to 6e-7 relative error at ``B/σ² = 10⁶``, 1.2e-3 to
    7.8e-3 at 10⁸ and 26–48 % at 10⁹; this way 4e-6 at 10⁹, what one map gets.
    """
    return whitened_variance_reduction(solve.whitening, solve.eigenvalues_grid)


def make_posterior(model: GridICMModel, targets: torch.Tensor, domain=None, exact_variance: bool = True,
                   test_coords: Sequence[torch.Tensor] | None = None, n_samples: int = VARIANCE_DRAWS) -> Posterior:
    """The structured posterior on a full grid; with missing pixels the Schur or dense one.

    A fit by the Schur complement by CG gets the exact factorised Schur posterior where
    its columns fit (:func:`~hyperspy_gp.memory.schur_columns_fit`) unless
    ``exact_variance`` is false (a memory budget), else
    :class:`~hyperspy_gp.gp.schur_iterative_prediction.SchurCGPosterior`: exact on ``test_coords``
    (the test grid, given) where streaming its variance, or computing it window by
    window, is affordable, otherwise with a Monte-Carlo variance increase.

    ``domain`` is ``(origin, shape)``: the pixel grid predictions will cover, ``shape``
    pixels per axis starting ``origin`` pixels before the training grid (by default
    the training grid).  Only the iterative posterior, which predicts on a lattice of the
    domain, needs it; the others predict at any coordinates.

    ``n_samples`` is the number of draws of a Monte-Carlo variance (iterative path,
    Schur complement by CG beyond its exact variance's limits).  Exact posteriors
    ignore it.
    """
    if model.iterative:
        from hyperspy_gp.gp.iterative_prediction import IterativePosterior

        return IterativePosterior(model, targets, n_samples=n_samples, domain=domain, test_coords=test_coords,
                                  exact_variance=exact_variance)
    if model.observed is None:
        return GridPosterior(model, targets)
    if model.masked_solver in ("schur", "schur-cg"):
        from hyperspy_gp.gp.schur import SchurPosterior, columns_fit

        # A fit by CG still gets the exact factorised posterior where its columns fit.
        if model.masked_solver == "schur" or (exact_variance and columns_fit(model)):
            return SchurPosterior(model, targets)
        from hyperspy_gp.gp.schur_iterative_prediction import SchurCGPosterior

        return SchurCGPosterior(model, targets, n_samples=n_samples,
                                test_coords=test_coords if exact_variance else None)
    from hyperspy_gp.gp.dense import MaskedPosterior

    return MaskedPosterior(model, targets)
