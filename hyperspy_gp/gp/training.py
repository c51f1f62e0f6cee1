"""Type-II maximum likelihood: fit the hyperparameters to the exact marginal likelihood.

L-BFGS-B (SciPy) on the unconstrained raw parameters, with the analytic gradient of
:mod:`~hyperspy_gp.gp.likelihood`.  With a handful of hyperparameters, quasi-Newton
steps converge in tens of iterations where Adam needs hundreds.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.optimize
import torch
from threadpoolctl import threadpool_limits

from hyperspy_gp.gp.iterative import CGConvergenceError
from hyperspy_gp.gp.model import GridICMModel

_logger = logging.getLogger(__name__)


#: Tightest relative tolerance used when the objective is a stochastic estimate (the
#: iterative path, the Schur complement by CG).  The probes are fixed and move smoothly
#: with the hyperparameters, so the estimate is a smooth function that L-BFGS-B can
#: converge on, but beyond its own error (about 0.5 in the log likelihood at 80² × 3)
#: there is nothing to gain.  Measured on 2 CPU cores, one run each: Matérn iterative
#: path, 80² × 3 maps with a masked quarter disc, from the default start 40, 46 and 56
#: iterations at 1e-6, 1e-7 and 1e-9, log likelihoods within 0.03; from the warm start
#: (:mod:`~hyperspy_gp.gp.warm_start`) 1e-6 stopped after 6 iterations 1.9 below the
#: optimum, 1e-7 after 15 at it (0.01 below).  Schur complement by CG, 64² × 6 with 20 %
#: of the pixels missing at random: 32 and 33 iterations at 1e-6 and 1e-7, the same
#: optimum.
STOCHASTIC_MIN_TOL = 1e-7


class ConvergenceWarning(UserWarning):
    """The marginal likelihood optimisation stopped before meeting its tolerance."""


#: ``FitResult.message`` of a fit stopped because conjugate gradients failed at a trial point.
CG_STOPPED = "stopped: CG did not converge at a trial point"


@dataclass
class FitResult:
    """Outcome of :func:`fit_model`.

    Attributes
    ----------
    converged
        Whether the tolerance was met.
    n_iterations
        Optimiser iterations taken.
    log_likelihood
        Final exact log marginal likelihood per model, ``(P,)``.
    gradient_norm
        Norm of the gradient of the normalised objective at the end.
    message
        The optimiser's own stopping message (one per distinct message in a batch).
    interrupted
        Whether the user interrupted the fit (Ctrl-C).
    history
        Per-iteration arrays (iteration 0 is the start): ``"lengthscale"`` (``(I, P,
        ndim)`` pixels), ``"noise"`` (``(I, P, T)``), ``"task_covariance"`` (``(I, P, T,
        T)``), ``"log_likelihood"`` (``(I, P)``); standardised units.
    """

    converged: bool
    n_iterations: int
    log_likelihood: np.ndarray
    gradient_norm: float
    message: str
    history: dict[str, np.ndarray] = field(default_factory=dict)
    interrupted: bool = False


def _flat_params(model: GridICMModel) -> list[torch.nn.Parameter]:
    return [p for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0])]


def fit_model(
    model: GridICMModel,
    targets: torch.Tensor,
    max_iter: int = 1000,
    tol: float = 1e-9,
    show_progressbar: bool = False,
) -> FitResult:
    """Maximise the exact marginal likelihood of each model of the batch, in place.

    The ``P`` models of a batch are independent GPs, and each gets its own optimiser
    run: one joint run would share line searches, curvature estimates and a stopping
    test between them, so that a clean map could stop or steer a noisy map into a
    worse optimum, and a map's result would depend on which other maps are fitted
    with it.  A Ctrl-C stops the whole batch (models not yet fitted keep their start).

    Parameters
    ----------
    model
        Model whose parameters are optimised (starting from their current values).
    targets
        ``(P, *grid, T)`` standardised maps.
    max_iter, tol, show_progressbar
        As for :func:`fit_single_model`, per model.

    Returns
    -------
    FitResult
        ``converged`` if every model converged; ``n_iterations`` and ``gradient_norm``
        are the largest over the models.  The history arrays of models that stopped
        earlier repeat their final values up to the longest run.
    """
    if model.n_models == 1:
        return fit_single_model(model, targets, max_iter, tol, show_progressbar)
    results = []
    for index in range(model.n_models):
        sub, sub_targets = model.submodel(index), targets[index : index + 1]
        if results and results[-1].interrupted:
            results.append(_not_fitted(sub, sub_targets))
            continue
        results.append(fit_single_model(sub, sub_targets, max_iter, tol, show_progressbar,
                                        description=f"GP training, map {index + 1}/{model.n_models}"))
        model.load_submodel(index, sub)
    return _merge_results(results)


def _not_fitted(model: GridICMModel, targets: torch.Tensor) -> FitResult:
    """The record of a model left at its start because the user interrupted the batch."""
    history = _History(model, targets)
    loglik = history.record()
    return FitResult(False, 0, loglik, float("nan"), "not fitted: interrupted by the user", history.as_arrays(), True)


def _merge_results(results: list[FitResult]) -> FitResult:
    n_rows = max(len(r.history["log_likelihood"]) for r in results)

    def padded(values: np.ndarray) -> np.ndarray:
        return np.concatenate([values, np.repeat(values[-1:], n_rows - len(values), axis=0)])

    history = {key: np.concatenate([padded(r.history[key]) for r in results], axis=1) for key in results[0].history}
    return FitResult(
        converged=all(r.converged for r in results),
        n_iterations=max(r.n_iterations for r in results),
        log_likelihood=np.concatenate([r.log_likelihood for r in results]),
        gradient_norm=float(np.nanmax([r.gradient_norm for r in results])),
        message="; ".join(dict.fromkeys(r.message for r in results)),
        history=history,
        interrupted=any(r.interrupted for r in results),
    )


def fit_single_model(
    model: GridICMModel,
    targets: torch.Tensor,
    max_iter: int = 1000,
    tol: float = 1e-9,
    show_progressbar: bool = False,
    description: str = "GP training",
) -> FitResult:
    """Maximise the exact marginal likelihood of ``model`` for ``targets`` in place.

    With a batch of several models this optimises them jointly, as one objective (the
    sum); :func:`fit_model` fits them one by one instead.

    Parameters
    ----------
    model
        Model whose parameters are optimised (starting from their current values).
    targets
        ``(P, *grid, T)`` standardised maps.
    max_iter
        Iteration cap; a :class:`ConvergenceWarning` is issued when it is reached.
    tol
        Relative tolerance on the objective (SciPy's ``ftol``); the projected gradient
        tolerance is ``sqrt(tol)``.  At least :data:`STOCHASTIC_MIN_TOL` for a model
        whose likelihood is a stochastic estimate (``model.stochastic_objective``).
    show_progressbar
        Show iteration, log likelihood and length scales with tqdm.
    description
        Label of the progress bar.

    Returns
    -------
    FitResult
        Convergence, final log likelihood and history.  When conjugate gradients
        (Schur complement by CG) fail at a trial point, the fit stops there and keeps
        its best iterate so far, with a :class:`ConvergenceWarning`; ``converged`` is
        then ``False``.
    """
    if model.stochastic_objective:
        tol = max(tol, STOCHASTIC_MIN_TOL)
    params = _flat_params(model)
    n_obs = targets.numel()
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def unpack(x: np.ndarray) -> None:
        with torch.no_grad():
            for p, chunk, shape in zip(params, np.split(x, np.cumsum(sizes)[:-1]), shapes):
                p.copy_(torch.as_tensor(chunk.reshape(shape), dtype=p.dtype, device=p.device))

    def pack(tensors) -> np.ndarray:
        return np.concatenate([t.detach().cpu().numpy().ravel() for t in tensors])

    # Every evaluation, by the bytes of its point: SciPy starts by evaluating the point
    # the history records first, and the fit ends on the point it evaluated last, so
    # neither needs a likelihood of its own (each costs up to a minute on a large masked
    # scan).  A few numbers per evaluation.
    evaluated: dict[bytes, tuple[float, np.ndarray, np.ndarray]] = {}

    def evaluate(x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """Loss, its gradient and the log likelihood per model at ``x``; leaves the model there."""
        unpack(x)
        if x.tobytes() not in evaluated:
            for p in params:
                p.grad = None
            loglik = model.log_likelihood(targets)
            loss = -loglik.sum() / n_obs
            loss.backward()
            grad = pack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
            if not np.all(np.isfinite(grad)) or not np.isfinite(loss.item()):
                raise FloatingPointError("non-finite marginal likelihood or gradient")
            evaluated[x.tobytes()] = (loss.item(), grad, loglik.detach().cpu().numpy())
        return evaluated[x.tobytes()]

    def objective(x: np.ndarray):
        loss, grad, _ = evaluate(x)
        return loss, grad.copy()  # (SciPy may modify it)

    x0 = pack(params).astype(np.float64)  # SciPy's dtype, so that its first call finds x0
    history = _History(model, targets)
    history.record(evaluate(x0)[2])
    progress = _progress(show_progressbar, max_iter, description)
    interrupted, cg_failure = False, None

    def callback(intermediate_result):
        x = intermediate_result.x
        unpack(x)
        cached = evaluated.get(x.tobytes())
        loglik = history.record(None if cached is None else cached[2])
        if progress is not None:
            ls = model.lengthscale.detach().cpu().numpy()
            progress.set_postfix(mll=f"{loglik.sum():.4g}", lengthscale=np.array2string(ls[0], precision=2))
            progress.update(1)

    try:
        # NumPy/SciPy's OpenBLAS threads spin between the optimiser's small calls and
        # starve torch's threads (measured: fits 4-5x slower on 2 cores); the
        # optimiser's own linear algebra is tiny, so it runs single-threaded.
        with threadpool_limits(limits=1, user_api="blas"):
            x_final, converged, message, n_iter = _minimize(objective, x0, callback, max_iter, tol)
    except KeyboardInterrupt:
        interrupted = True
        x_final = history.best_x if history.best_x is not None else x0
        converged, message, n_iter = False, "interrupted by the user", len(history.rows) - 1
    except CGConvergenceError as exc:
        # A trial point (lower noise, longer length scales) left CG ill-conditioned; the
        # iterates before it were solved to tolerance, so the best of them is kept.
        cg_failure = exc
        x_final = history.best_x
        converged, message, n_iter = False, CG_STOPPED, len(history.rows) - 1
    finally:
        if progress is not None:
            progress.close()
    _, grad, loglik = evaluate(x_final)  # leaves the model at x_final
    grad_norm = float(np.linalg.norm(grad))
    if interrupted:
        warnings.warn(
            "GP training interrupted: continuing with the best hyperparameters found so far "
            f"(after {n_iter} iterations).",
            ConvergenceWarning,
            stacklevel=3,
        )
    elif cg_failure is not None:
        warnings.warn(
            f"GP training stopped after {n_iter} iterations: {cg_failure} Continuing with the best "
            "hyperparameters found before that point; they are not the optimum (converged=False).",
            ConvergenceWarning,
            stacklevel=3,
        )
    elif not converged:
        warnings.warn(
            f"GP training did not converge in {n_iter} iterations ({message}); final "
            f"gradient norm {grad_norm:.3g}. Increase `max_iter` or loosen `tol`.",
            ConvergenceWarning,
            stacklevel=3,
        )
    _logger.info("GP fit: %s after %d iterations, log likelihood %s", message, n_iter, loglik)
    return FitResult(converged, n_iter, loglik, grad_norm, message, history.as_arrays(), interrupted)


def _lbfgsb(objective, x0: np.ndarray, callback, max_iter: int, tol: float):
    return scipy.optimize.minimize(
        objective,
        x0,
        jac=True,
        method="L-BFGS-B",
        callback=callback,
        options={"maxiter": max_iter, "ftol": tol, "gtol": np.sqrt(tol) * 1e-2},
    )


def _minimize(objective, x0: np.ndarray, callback, max_iter: int, tol: float) -> tuple[np.ndarray, bool, str, int]:
    """L-BFGS-B, restarted once from where an abnormal line search stopped it.

    L-BFGS-B gives up ("ABNORMAL") when its line search finds no decrease along the
    quasi-Newton direction, which happens on flat likelihoods (e.g. a length scale
    running far beyond the scan) with curvature pairs gone stale.  A restart drops the
    stale pairs; if it cannot lower the objective either, the point is stationary to
    the precision of the objective and is reported as converged.

    Returns
    -------
    tuple
        ``(x, converged, message, n_iterations)``.
    """
    res = _lbfgsb(objective, x0, callback, max_iter, tol)
    n_iter = int(res.nit)
    if res.success or "ABNORMAL" not in str(res.message) or n_iter >= max_iter:
        return res.x, bool(res.success), str(res.message), n_iter
    _logger.info("L-BFGS-B line search stopped after %d iterations; restarting once", n_iter)
    again = _lbfgsb(objective, res.x, callback, max_iter - n_iter, tol)
    n_iter += int(again.nit)
    x = again.x if again.fun <= res.fun else res.x
    if again.success:
        return x, True, f"{again.message} (after one restart)", n_iter
    stalled = again.fun >= res.fun - tol * max(abs(res.fun), 1.0)
    if stalled and "ABNORMAL" in str(again.message):
        return x, True, "CONVERGENCE: no decrease of the objective possible after a restart", n_iter
    return x, False, str(again.message), n_iter


class _History:
    """Hyperparameters and likelihood per iteration, plus the best parameters seen."""

    def __init__(self, model: GridICMModel, targets: torch.Tensor) -> None:
        self.model, self.targets = model, targets
        self.rows: list[dict[str, np.ndarray]] = []
        self.best_x: np.ndarray | None = None
        self._best = -np.inf

    def record(self, loglik: np.ndarray | None = None) -> np.ndarray:
        if loglik is None:
            with torch.no_grad():
                loglik = self.model.log_likelihood(self.targets).cpu().numpy()
        row = {k: v.cpu().numpy() for k, v in self.model.state().items()}
        row["log_likelihood"] = loglik
        self.rows.append(row)
        if loglik.sum() > self._best:
            self._best = loglik.sum()
            self.best_x = np.concatenate(
                [p.detach().cpu().numpy().ravel() for p in _flat_params(self.model)]
            )
        return loglik

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.stack([row[k] for row in self.rows]) for k in self.rows[0]}


def _progress(show: bool, total: int, description: str):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="it")
