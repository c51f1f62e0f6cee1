"""Benchmark of the iterative path's variance: windows (exact, or within a stated bound) against the draws.

Prints one table: for each scan size, number of maps T and length scale, the variance
``gp_reconstruct`` takes after a fit on the iterative path (``kernel="matern"``), at 2×
upsampling, and, as the baseline in the same process, the Monte-Carlo estimate from 64
draws it replaces.  Columns: the path (``exact``: windows of 6 length scales;
``winC``: windows of ``C`` length scales, within their stated bound; ``MC``: drawn), the
seconds of the posterior and prediction, the largest bound it reports relative to the
variance; the draws' seconds, their median and largest standard error relative to the
variance, and the largest relative difference between the two variances (where the
windows serve, the draws' error); and the draws' z-scores, the difference over the
draws' reported standard error (and the shorter windows' bound, in quadrature), at the
pixels where the two differ by more than 1e-8 (inside the scan both are the periodic
twin's variance): their rms (1 for a calibrated standard error; less where the bound
dominates) and the fraction beyond 4 (0.006 % for a Gaussian).

The models are the iterative path's default start (``B_tt`` about 0.9, noise 0.1 of
the standardised maps) with the length scale of the row, conditioned on the synthetic
lattice maps of ``bench_engine.synthetic_maps``: the variance does not depend on the
maps, only on the hyperparameters.  Prediction only, no fit.

Usage::

    python benchmarks/bench_variance.py           # 128² and 256² × 6, 3 to 12 px (about 8 minutes on 2 cores)
    python benchmarks/bench_variance.py --quick   # 64² × 3 (under a minute)
    python benchmarks/bench_variance.py --sizes 128 --tasks 6 --lengthscales 5 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import synthetic_maps

from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.model import GridICMModel
from hyperspy_gp.gp.prediction import make_posterior


def _model(side: int, n_tasks: int, lengthscale: float):
    kernel = GridKernel((side, side), "matern")
    model = GridICMModel(kernel, 1, n_tasks, rank=1, iterative=True)
    model.reset_parameters(lengthscale)
    targets = torch.as_tensor(synthetic_maps(side, n_tasks))[None]
    return model, targets


def run_case(side: int, n_tasks: int, lengthscale: float) -> dict:
    """Windows (as ``gp_reconstruct`` chooses) and draws on the same model, 2× upsampling."""
    model, targets = _model(side, n_tasks, lengthscale)
    coords = [model.kernel.axis_coordinates(side, 2)] * 2
    out = {"side": side, "tasks": n_tasks, "lengthscale": lengthscale}
    variances, errors = {}, {}
    for name, exact in (("windows", True), ("drawn", False)):
        start = time.perf_counter()
        posterior = make_posterior(model, targets, exact_variance=exact, test_coords=coords)
        variance = posterior.predict(coords)[1]
        error = torch.zeros_like(variance) if posterior.variance_is_exact else \
            posterior.variance_standard_error(coords)
        out[f"{name}_s"] = time.perf_counter() - start
        relative = error / variance
        out[f"{name}_error_median"], out[f"{name}_error_max"] = float(relative.median()), float(relative.max())
        variances[name], errors[name] = variance, error
        if exact:
            margin = posterior.window_lengthscales
            out["path"] = "exact" if posterior.variance_is_exact else "MC" if margin is None else f"win{margin:g}"
    difference = variances["drawn"] - variances["windows"]
    out["difference_max"] = float((difference / variances["windows"]).abs().max())
    # The draws' z-scores where they estimate anything (inside, both are the twin's
    # variance), against shorter windows with their bound taken as a standard error too.
    spread = (errors["drawn"].pow(2) + errors["windows"].pow(2)).sqrt()
    z = (difference / spread)[difference.abs() > 1e-8 * variances["windows"]]
    out["z_rms"] = float(z.pow(2).mean().sqrt()) if z.numel() else 0.0
    out["z_beyond_4"] = float((z.abs() > 4).double().mean()) if z.numel() else 0.0
    return out


HEADER = (
    " grid   T     ℓ | windows: path    (s)  bound max | drawn:   (s)  se median  se max | max |Δ|/var  z rms  |z|>4\n"
    "------------------------------------------------------------------------------------------------------------"
)


def format_row(r: dict) -> str:
    return (f"{r['side']:>4}² {r['tasks']:>3} {r['lengthscale']:>5.1f} | {r['path']:>12} {r['windows_s']:6.1f}"
            f"  {r['windows_error_max']:9.1e} | {r['drawn_s']:12.1f}  {r['drawn_error_median']:9.1e}"
            f"  {r['drawn_error_max']:6.1e} | {r['difference_max']:11.1e}  {r['z_rms']:5.2f}  {r['z_beyond_4']:5.1%}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64² × 3 maps only (under a minute)")
    parser.add_argument("--sizes", nargs="+", type=int, metavar="SIDE")
    parser.add_argument("--tasks", nargs="+", type=int, metavar="T")
    parser.add_argument("--lengthscales", nargs="+", type=float, metavar="PX")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([64] if args.quick else [128, 256])
    tasks = args.tasks or ([3] if args.quick else [6])
    lengthscales = args.lengthscales or ([3.0, 8.0] if args.quick else [3.0, 6.0, 12.0])
    torch.set_default_dtype(torch.float64)
    print(f"float64, torch {torch.__version__}, {torch.get_num_threads()} threads; iterative path, non-separable "
          "Matérn-5/2, 2× upsampling, 64 draws")
    print(HEADER)
    for side in sizes:
        for n_tasks in tasks:
            for lengthscale in lengthscales:
                print(format_row(run_case(side, n_tasks, lengthscale)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
