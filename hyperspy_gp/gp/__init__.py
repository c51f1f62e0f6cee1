"""The exact grid-structured Gaussian-process engine.

Where things live:

- :mod:`~hyperspy_gp.gp.kernels` — Matérn-5/2 kernels on a regular scan grid
  (separable product of 1-D factors, or the non-separable anisotropic kernel).
- :mod:`~hyperspy_gp.gp.tensor` — mode products on grid-shaped tensors.
- :mod:`~hyperspy_gp.gp.likelihood` — the exact marginal log likelihood of the
  intrinsic-coregionalization model and its analytic gradient.
- :mod:`~hyperspy_gp.gp.model` — parameters and constraints (length scales, task
  covariance ``B = W Wᵀ + diag(v)``, per-map noise).
- :mod:`~hyperspy_gp.gp.training` — maximisation of the marginal likelihood.
- :mod:`~hyperspy_gp.gp.prediction` — predictive mean and variance on a (denser) grid.
- :mod:`~hyperspy_gp.gp.schur`, :mod:`~hyperspy_gp.gp.schur_iterative`,
  :mod:`~hyperspy_gp.gp.dense` — exact inference with missing pixels (Schur
  complement factorised or by conjugate gradients, dense Cholesky);
  :mod:`~hyperspy_gp.gp.schur_iterative_prediction` — the prediction after a fit by
  the Schur complement by CG.
- :mod:`~hyperspy_gp.gp.toeplitz`, :mod:`~hyperspy_gp.gp.iterative`,
  :mod:`~hyperspy_gp.gp.iterative_prediction` — any stationary kernel on a complete
  grid: FFT products, conjugate gradients, a stochastic log-determinant;
  :mod:`~hyperspy_gp.gp.iterative_missing` and :mod:`~hyperspy_gp.gp.pixel_rows` — the
  same with missing pixels.

This subpackage imports torch; nothing outside it does at import time.
"""
