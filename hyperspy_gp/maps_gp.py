"""Fit and predict a set of loading maps with the exact grid GP.

The array-level core of :func:`hyperspy_gp.gp_reconstruct`: standardise the maps on
their measured pixels, build the batch of grid ICM models (one parallel model, or one
model per map), maximise the marginal likelihood, predict mean and variance on the
upsampled grid as dask tasks, and bring everything back to the units of the maps.
No HyperSpy signal is involved, so benchmarks can call it directly.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from hyperspy_gp import _hyperspy as hsglue
from hyperspy_gp.request import Request

_logger = logging.getLogger(__name__)


@dataclass
class MapsFit:
    """GP mean and variance of the maps on the upsampled grid, with the fit's record.

    Attributes
    ----------
    mean, variance
        ``(*upsampled_grid, T)`` in the units of the maps.
    hyperparameters
        Length scales (pixels), task covariance, noise, log likelihood, convergence and
        jitter, in the units of the maps; where the fit started from the optimum on a
        complete rectangle (missing pixels, or a large scan on the iterative path:
        :mod:`~hyperspy_gp.gp.warm_start`; ``warm_start_imputed_pixels`` where that
        was the whole grid with its missing pixels filled in),
        that rectangle (``warm_start_region``, scan pixels per axis, stop excluded)
        and the iterations of its fit (``warm_start_iterations``).
    history
        Per-iteration values in standardised units (see :class:`~hyperspy_gp.gp.training.FitResult`).

    Examples
    --------
    >>> fit = MapsFit(np.zeros((4, 4, 1)), np.ones((4, 4, 1)), {}, {})
    >>> fit.mean.shape == fit.variance.shape
    True
    """

    mean: np.ndarray  # (*upsampled_grid, T), map units
    variance: np.ndarray
    hyperparameters: dict
    history: dict


def fit_and_predict_maps(maps, request: Request, isotropic, max_iter, tol, show_progressbar) -> MapsFit:
    """Fit the GP to ``maps`` and predict mean and variance on the upsampled grid.

    Parameters
    ----------
    maps : numpy.ndarray
        Loading maps ``(*grid, T)``, NaN where a pixel is missing.
    request : Request
        Mode, kernel, rank, bounds, solver (``request.observed``), upsampling, chunks,
        device and dtype.  When the Schur complement by CG fails during the fit and
        ``request.exact_fallback`` refits instead, its solver is updated to that path.
    isotropic, max_iter, tol, show_progressbar
        As in :func:`hyperspy_gp.gp_reconstruct` (``show_progressbar`` resolved to a bool).

    Returns
    -------
    MapsFit
        Mean and variance in the units of the maps, hyperparameters and history.

    Examples
    --------
    >>> import numpy as np
    >>> from hyperspy_gp.request import Request
    >>> yy, xx = np.mgrid[:10, :10]
    >>> maps = np.stack([np.sin(xx / 2.0) + 0.1 * np.cos(yy), np.cos(yy / 3.0)], -1)
    >>> request = Request([0, 1], "parallel", 2, None, "separable", 1, "auto", "cpu", "float64", None)
    >>> fit = fit_and_predict_maps(maps, request, False, 1000, 1e-9, False)
    >>> fit.mean.shape, fit.variance.shape
    ((20, 20, 2), (20, 20, 2))
    """
    import torch

    from hyperspy_gp.gp.iterative import CGConvergenceError
    from hyperspy_gp.gp.kernels import GridKernel
    from hyperspy_gp.gp.model import GridICMModel, initial_lengthscale
    from hyperspy_gp.gp.prediction import make_posterior
    from hyperspy_gp.gp.training import fit_model
    from hyperspy_gp.gp.warm_start import warm_start
    from hyperspy_gp.memory import explain_gpu_out_of_memory

    grid = maps.shape[:-1]
    n_maps = maps.shape[-1]
    origin, points = request.fitted_coordinates(grid)
    standardised, centre, scale = standardise(request.fitted_region(maps))
    measured = np.isfinite(maps).all(axis=-1)
    torch_dtype = getattr(torch, request.dtype)
    kernel = GridKernel(standardised.shape[:-1], request.kernel, dtype=torch_dtype, device=request.device,
                        points=points)
    def build_model(masked_solver: str) -> GridICMModel:
        n_models, n_tasks, rank = (1, n_maps, request.rank) if request.mode == "parallel" else (n_maps, 1, 0)
        return GridICMModel(kernel, n_models, n_tasks, rank=rank, isotropic=isotropic,
                            lengthscale_bounds=request.lengthscale_bounds, observed=request.observed,
                            masked_solver=masked_solver, iterative=request.iterative)

    targets = standardised[None] if request.mode == "parallel" else np.moveaxis(standardised, -1, 0)[..., None]
    targets_t = torch.as_tensor(np.ascontiguousarray(targets), dtype=torch_dtype, device=request.device)
    model = build_model(request.masked_solver)

    def fit(model: GridICMModel):
        if request.exact_fallback is None:
            return model, fit_model(model, targets_t, max_iter=max_iter, tol=tol, show_progressbar=show_progressbar)
        return _fit_with_exact_fallback(model, build_model, targets_t, request, max_iter, tol, show_progressbar)

    with explain_gpu_out_of_memory():
        warm = warm_start(model, targets_t, max_iter, tol, show_progressbar)  # start near the optimum where it pays
        try:
            model, result = fit(model)
        except CGConvergenceError:
            if warm is None:
                raise
            # CG failed at the warm start itself (the optimum's low noise): the default start instead.
            _logger.info("CG did not converge at the warm start; fitting from the default start")
            model.reset_parameters(initial_lengthscale(request.lengthscale_bounds))
            warm = None
            model, result = fit(model)

    # The whole scan, in pixels of the fitted box (negative before it).
    test_coords = [kernel.axis_coordinates(n, request.upsampling) - start for n, start in zip(grid, origin)]
    posterior = make_posterior(model, targets_t, domain=(origin, grid), exact_variance=request.exact_posterior,
                               test_coords=test_coords, n_samples=request.variance_samples)
    if request.dense_variance and request.exact_posterior:
        posterior = exact_on_small_grids(posterior, model, targets_t)
    # A Monte-Carlo variance (its standard error from the same draws) or windows with a
    # shorter margin (their error bound).
    drawn = not posterior.variance_is_exact
    with hsglue.dask_progressbar(show_progressbar):
        mean, variance, *error = posterior.predict_arrays(test_coords, chunk_rows=request.chunks,
                                                          standard_error=drawn)
    mean, variance = _per_map(mean, request.mode), _per_map(variance, request.mode)
    mean = centre + scale * mean
    variance = scale**2 * variance
    hyper = _hyperparameters(model, result, request.mode, scale, int(measured.sum()))
    if warm is not None:  # in scan pixels (numpy axis order, stop excluded)
        hyper["warm_start_region"] = np.array([[start + int(kept[s][0]), start + int(kept[s][-1]) + 1]
                                               for start, kept, s in zip(origin, points, warm.rectangle)])
        hyper["warm_start_iterations"] = warm.n_iterations
        if warm.n_imputed:  # the whole grid, its missing pixels filled in from their neighbours
            hyper["warm_start_imputed_pixels"] = warm.n_imputed
    hyper["jitter"] = _report_jitter(posterior.jitter.detach().cpu().numpy(), request.mode, scale)
    if drawn:
        if posterior.n_samples:
            hyper["variance_samples"] = posterior.n_samples
        else:
            hyper["variance_window_lengthscales"] = posterior.window_lengthscales
        hyper["variance_standard_error"] = _per_map(error[0], request.mode) * scale**2
    return MapsFit(mean, variance, hyper, result.history)


def exact_on_small_grids(posterior, model, targets):
    """The dense eigenbasis posterior where an iterative one's variance is not exact on a small complete grid.

    Called where ``solver="auto"`` chose the iterative path
    (:attr:`~hyperspy_gp.request.Request.dense_variance`; a forced ``"iterative"`` keeps
    its own posterior).  ``solver="auto"`` fits ``kernel="matern"`` iteratively beyond
    :data:`~hyperspy_gp.request.AUTO_DENSE_MATERN_PIXELS` (far cheaper per evaluation),
    but up to :data:`~hyperspy_gp.request.MAX_DENSE_PIXELS` one dense eigendecomposition
    of the kernel still fits, and it gives the exact variance at any length scale where
    the iterative posterior's windows do not reach, where it would draw a Monte-Carlo
    estimate.  Measured on 2 CPU cores: 64² × 3 maps at 2×, length scale 30 px, 18 s
    against 13 s for the estimate (whose largest error was 21 % of the variance, z rms
    1.1); 48² × 6 at 4×, 20 px, 8.6 s against 12.7 s (17 %).  Windows with a shorter
    margin are kept: within their stated bound, they cost a quarter of the dense path
    (64² × 6 at 4×, 12 px: 10 s against 41 s, and 5·10⁻⁷ from it).  Any other
    ``posterior`` is returned as it is.

    Parameters
    ----------
    posterior
        From :func:`~hyperspy_gp.gp.prediction.make_posterior` for ``model``.
    model : GridICMModel
        The fitted model.
    targets : torch.Tensor
        Its standardised training maps.

    Returns
    -------
    Posterior
    """
    import math

    from hyperspy_gp.gp.model import GridICMModel
    from hyperspy_gp.gp.prediction import make_posterior
    from hyperspy_gp.request import MAX_DENSE_PIXELS

    drawn = model.iterative and not posterior.variance_is_exact and posterior.window_lengthscales is None
    if not drawn or model.observed is not None or math.prod(model.kernel.grid_shape) > MAX_DENSE_PIXELS:
        return posterior
    dense = GridICMModel(model.kernel, model.n_models, model.n_tasks, rank=model.rank, isotropic=model.isotropic,
                         lengthscale_bounds=model.lengthscale_bounds)
    dense.load_state_dict(model.state_dict())
    _logger.info("Exact variance from the kernel's dense eigendecomposition (%d pixels), where the iterative "
                 "posterior's windows do not reach", math.prod(model.kernel.grid_shape))
    return make_posterior(dense, targets)


def _fit_with_exact_fallback(model, build_model, targets, request: Request, max_iter, tol, show_progressbar):
    """Fit by the Schur complement by CG; if CG fails, refit with ``request.exact_fallback``.

    The refit starts from the best iterate of the CG fit, or from its start where CG
    failed there.  Returns ``(model, result)``.
    """
    from hyperspy_gp.gp.iterative import CGConvergenceError
    from hyperspy_gp.gp.training import CG_STOPPED, fit_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fit_model(model, targets, max_iter=max_iter, tol=tol, show_progressbar=show_progressbar)
            where = f"after {result.n_iterations} iterations of the fit"
        except CGConvergenceError:  # at the start (a warm start's low noise): no iterate yet
            result, where = None, "at the start of the fit"
    if result is not None and CG_STOPPED not in result.message:  # (a batch of maps joins its maps' messages)
        for warning in caught:
            warnings.warn(warning.message, warning.category, stacklevel=3)
        return model, result
    warnings.warn(
        f"The Schur complement by conjugate gradients stopped converging {where} "
        f"(large masked regions, low noise); refitting with the exact factorised path "
        f"(masked solver {request.exact_fallback!r}), slower but direct, from the best hyperparameters so far.",
        UserWarning, stacklevel=3,
    )
    exact = build_model(request.exact_fallback)
    exact.load_state_dict(model.state_dict())
    # The outputs' metadata report the path that gave the result.
    request.schur_cg, request.solver = False, "dense" if request.exact_fallback == "dense" else "kronecker"
    return exact, fit_model(exact, targets, max_iter=max_iter, tol=tol, show_progressbar=show_progressbar)


def standardise(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero mean, unit variance per map over the measured pixels; missing pixels 0.

    Parameters
    ----------
    maps : numpy.ndarray
        Loading maps ``(*grid, T)``, NaN where a pixel is missing.

    Returns
    -------
    standardised, centre, scale : numpy.ndarray
        The maps ``(maps - centre) / scale`` (0 where missing), and the per-map
        ``centre`` and ``scale`` ``(T,)`` that bring GP results back to map units.

    Examples
    --------
    >>> z, centre, scale = standardise(np.array([[1.0, 10.0], [3.0, np.nan], [5.0, 30.0]]))
    >>> z[:, 0], centre, scale
    (array([-1.,  0.,  1.]), array([ 3., 20.]), array([ 2., 10.]))
    """
    measured = np.isfinite(maps).all(axis=-1)
    centre, scale = maps[measured].mean(axis=0), maps[measured].std(axis=0)
    return np.where(measured[..., None], (maps - centre) / scale, 0.0), centre, scale


def _report_jitter(jitter: np.ndarray, mode: str, scale: np.ndarray) -> np.ndarray:
    """Jitter per map in map units (like ``noise_variance``); warn when any was added."""
    from hyperspy_gp.gp.cholesky import JitterWarning

    per_map = (jitter[0] if mode == "parallel" else jitter) * scale**2
    if np.any(per_map > 0):
        warnings.warn(
            f"The GP covariance was numerically singular (very long length scales, near-zero "
            f"noise or nearly identical maps); jitter {np.array2string(per_map, precision=3)} was "
            "added to the noise variance of the maps to factorise it. It is recorded as "
            "hyperparameters['jitter']; consider a smaller upper length-scale bound or fewer components.",
            JitterWarning,
            stacklevel=4,
        )
    return per_map


def _per_map(x: np.ndarray, mode: str) -> np.ndarray:
    """``(P, *grid, T)`` → ``(*grid, n_maps)``."""
    return x[0] if mode == "parallel" else np.moveaxis(x[..., 0], 0, -1)


def _hyperparameters(model, result, mode: str, scale: np.ndarray, n_pixels: int) -> dict:
    state = {k: v.detach().cpu().numpy() for k, v in model.state().items()}
    n_maps = scale.size
    if mode == "parallel":
        lengthscale = np.repeat(state["lengthscale"], n_maps, axis=0)
        b = state["task_covariance"][0] * np.outer(scale, scale)
        noise = state["noise"][0] * scale**2
        loglik = result.log_likelihood - n_pixels * np.log(scale).sum()
    else:
        lengthscale = state["lengthscale"]
        b = np.diag(state["task_covariance"][:, 0, 0] * scale**2)
        noise = state["noise"][:, 0] * scale**2
        loglik = result.log_likelihood - n_pixels * np.log(scale)
    return {
        "lengthscale_px": lengthscale,
        "task_covariance": b,
        "noise_variance": noise,
        "log_likelihood": np.atleast_1d(loglik),
        "iterations": int(result.n_iterations),
        "converged": bool(result.converged),
        "gradient_norm": float(result.gradient_norm),
        "optimizer_message": result.message,
    }
