"""Cholesky factorisation that adds (and reports) jitter when round-off needs it.

Every covariance the engine factorises, the ``T × T`` blocks ``λ_j B + D`` of the
Kronecker path and ``B ⊗ K_OO + D ⊗ I`` of the dense path, is positive definite in
exact arithmetic because the noise ``D`` is bounded below.  In floating point it may
not be: very long length scales (``K`` nearly rank one), near-zero noise, identical
maps (``B`` nearly singular) or large trial steps of the optimiser push the smallest
eigenvalue below the round-off of the largest.  Then a small multiple of the identity
(*jitter*) is added, the same to every block of a model, so the factorised matrix is
still the covariance ``Σ + εI`` of the model with noise ``D + εI``.

Jitter is chosen per model of the batch, relative to its largest diagonal entry, and
grows by 100× from ``10 ε_mach`` up to :data:`MAX_RELATIVE_JITTER`; beyond that a
:class:`NotPositiveDefiniteError` is raised.
"""

from __future__ import annotations

import torch

#: Largest jitter, relative to the largest diagonal entry of the matrix, per dtype.
MAX_RELATIVE_JITTER = {torch.float64: 1e-6, torch.float32: 1e-3}


class JitterWarning(UserWarning):
    """Jitter was added to a covariance to factorise it (see the module docstring)."""


class NotPositiveDefiniteError(torch.linalg.LinAlgError):
    """A covariance stayed numerically indefinite with the largest allowed jitter."""


def relative_jitter_steps(dtype: torch.dtype) -> list[float]:
    """Relative jitters tried in turn: ``10 ε, 1000 ε, ...``, capped by the maximum."""
    eps = torch.finfo(dtype).eps
    largest = MAX_RELATIVE_JITTER.get(dtype, 1e-3)
    steps, step = [], 10 * eps
    while step < largest:
        steps.append(step)
        step *= 100
    return steps + [largest]


def safe_cholesky(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factor of a batch of symmetric matrices, with jitter if needed.

    Parameters
    ----------
    matrix
        ``(P, ..., N, N)``: ``P`` models, any batch of blocks per model.  Differentiable
        (the jitter is a constant).

    Returns
    -------
    chol : torch.Tensor
        Lower factor of ``matrix + jitter_p I`` (same shape as ``matrix``).
    jitter : torch.Tensor
        ``(P,)`` absolute jitter added to each model, 0 where none was needed.

    Raises
    ------
    NotPositiveDefiniteError
        When a model is not factorisable with the largest jitter.

    Examples
    --------
    >>> import torch
    >>> from hyperspy_gp.gp.cholesky import safe_cholesky
    >>> ones = torch.ones(1, 3, 3, dtype=torch.float64)  # rank one
    >>> chol, jitter = safe_cholesky(ones)
    >>> bool(jitter[0] > 0), bool(torch.isfinite(chol).all())
    (True, True)
    >>> safe_cholesky(torch.eye(2, dtype=torch.float64)[None])[1]
    tensor([0.], dtype=torch.float64)
    """
    n_models = matrix.shape[0]
    jitter = torch.zeros(n_models, dtype=matrix.dtype, device=matrix.device)
    chol, info = torch.linalg.cholesky_ex(matrix)
    failed = _failed_models(info, n_models)
    if not failed.any():
        return chol, jitter
    with torch.no_grad():
        if not torch.isfinite(matrix).all():
            raise NotPositiveDefiniteError(
                "The GP covariance contains NaN or inf (non-finite hyperparameters or maps); "
                "jitter cannot repair it."
            )
        diagonal = torch.diagonal(matrix, dim1=-2, dim2=-1).abs()
        scale = diagonal.reshape(n_models, -1).amax(dim=-1).clamp_min(torch.finfo(matrix.dtype).tiny)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for relative in relative_jitter_steps(matrix.dtype):
        jitter = torch.where(failed, relative * scale, jitter)
        chol, info = torch.linalg.cholesky_ex(matrix + jitter.reshape(-1, *[1] * (matrix.dim() - 1)) * eye)
        failed = _failed_models(info, n_models)
        if not failed.any():
            return chol, jitter
    raise NotPositiveDefiniteError(
        f"The GP covariance of model(s) {failed.nonzero().flatten().tolist()} is not positive "
        f"definite even with a jitter of {MAX_RELATIVE_JITTER.get(matrix.dtype, 1e-3):g} × its "
        "largest variance. Use dtype='float64', a smaller upper length-scale bound, or leave "
        "out components whose maps are (nearly) identical."
    )


def _failed_models(info: torch.Tensor, n_models: int) -> torch.Tensor:
    return (info != 0).reshape(n_models, -1).any(dim=-1)
