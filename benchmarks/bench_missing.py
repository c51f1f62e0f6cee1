"""Benchmark of the exact paths for missing pixels, against the complete grid in the same run.

Prints one table: for each scan size and mask pattern, the path ``solver="auto"``
chooses (``lines``: scan lines without data left out, ``schur``: Schur complement
factorised, ``schur-cg``: Schur complement by conjugate gradients with a stochastic
log-determinant, ``dense``: Cholesky on the measured pixels), the seconds per
likelihood + gradient evaluation, the CG iterations of that evaluation, the time of the
whole reconstruction of the maps (fit and 2× upsampled prediction with variance) with
the most CG iterations any of its solves needed (they grow as the fit lowers the noise),
whether its variance is exact, a Monte-Carlo estimate (``MC``) or from windows of ``C``
length scales within their stated bound (``winC``), the peak RSS of the
process that ran the case, and the evaluation's cost relative to the complete grid (the
first row of each size, run in the same way); where the fit started from the optimum on
the largest complete rectangle (:mod:`hyperspy_gp.gp.warm_start`), the row says so,
with that fit's iterations.  ``quarter disc`` masks
a corner (a connected region, as a navigation mask over vacuum), which the coarse-space
correction of the Schur complement by CG serves; ``disc, tiles only`` is the same
case with block-Jacobi alone, the coarse space's baseline ("failed" when its CG does not
converge; "fit stopped" when CG failed at a trial point of the fit, which then kept its
best iterate).

The maps are the separable-kernel parallel GP's usual synthetic lattice
(``bench_engine.synthetic_maps``); every case runs in a fresh subprocess so that its
peak RSS is its own.

Usage::

    python benchmarks/bench_missing.py          # 64² and 128² × 6 maps (40 minutes on 2 cores)
    python benchmarks/bench_missing.py --quick  # 48² × 3 maps (about two minutes)
    python benchmarks/bench_missing.py --sides 128 --patterns "edge lines" "every other line"
    python benchmarks/bench_missing.py --device cuda --sides 128 --patterns "quarter disc"
    python benchmarks/bench_missing.py --kernel matern --sides 128 --patterns "20 dead pixels" "1% random" "5% random"
    python benchmarks/bench_missing.py --kernel matern --maps 3 --sides 128 --patterns "90% random"

With ``--kernel matern`` (the paper's non-separable kernel) the complete grid and a few
missing pixels take the iterative path (``iterative``: conjugate gradients on the
observed values); masks with more missing pixels than it serves take the dense path on
the measured pixels where those fit it (a sparse scan), and are reported as refused
otherwise.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import _timeit, counting_cg, mll_and_grad, synthetic_maps

#: Mask patterns, in table order; the first is the baseline.
PATTERNS = ("complete", "20 dead pixels", "1% random", "edge lines", "every other line", "5% random", "20% random",
            "50% random", "quarter disc", "disc, tiles only")
#: Patterns run only when named (``--patterns``): a sparse scan, 10 % of the pixels measured.
SPARSE_PATTERNS = ("90% random",)


def missing_mask(pattern: str, side: int) -> np.ndarray:
    """Boolean ``(side, side)`` grid of the missing pixels of ``pattern``."""
    rng = np.random.default_rng(1)
    mask = np.zeros((side, side), dtype=bool)
    if pattern == "20 dead pixels":
        mask.flat[rng.choice(side * side, 20, replace=False)] = True
    elif pattern == "edge lines":  # distorted first lines and a flyback column
        mask[: side // 10], mask[:, -1] = True, True
    elif pattern == "every other line":
        mask[1::2] = True
    elif pattern.endswith("% random"):
        mask = rng.random((side, side)) < int(pattern.split("%")[0]) / 100
    elif pattern in ("quarter disc", "disc, tiles only"):  # a masked corner (vacuum), radius 0.6 of the side
        yy, xx = np.mgrid[:side, :side]
        mask = (yy - side + 1) ** 2 + (xx - side + 1) ** 2 < (0.6 * side) ** 2
    return mask


def run_case(side: int, n_tasks: int, pattern: str, device: str = "cpu", kernel: str = "separable") -> dict:
    import torch
    from threadpoolctl import threadpool_limits

    from hyperspy_gp.gp import iterative, schur_iterative
    from hyperspy_gp.gp.iterative import CGConvergenceError
    from hyperspy_gp.gp.kernels import GridKernel
    from hyperspy_gp.gp.model import GridICMModel
    from hyperspy_gp.maps_gp import fit_and_predict_maps, standardise
    from hyperspy_gp.request import Request, choose_solver

    if pattern == "disc, tiles only":  # block-Jacobi alone: no coarse space
        GridICMModel.coarse_lattice = None
    maps = synthetic_maps(side, n_tasks)
    maps[missing_mask(pattern, side)] = np.nan
    request = Request(list(range(n_tasks)), "parallel", 2, None, kernel, 1, "auto", device, "float64", None)
    missing = int(np.isnan(maps[..., 0]).sum())
    try:
        request.observed = choose_solver(maps, request)
    except ValueError as error:
        return {"side": side, "tasks": n_tasks, "pattern": pattern, "path": "—", "missing": missing,
                "refused": str(error).split(";")[0]}
    if request.observed is not None:
        path = request.masked_solver
    else:
        path = "complete" if request.lines is None else "lines"

    # One evaluation of the model that fit_and_predict_maps builds.
    points = request.fitted_coordinates(maps.shape[:-1])[1]
    targets = torch.tensor(standardise(request.fitted_region(maps))[0][None], device=device)
    model = GridICMModel(GridKernel(targets.shape[1:-1], kernel, points=points, device=device), 1, n_tasks, rank=1,
                         observed=request.observed, masked_solver=request.masked_solver, iterative=request.iterative)
    with counting_cg(iterative if request.iterative else schur_iterative) as iterations:
        try:
            with threadpool_limits(limits=1, user_api="blas"):
                per_eval = _timeit(lambda: mll_and_grad(model, targets), repeat=1 if side >= 128 else 3)
            first = max(iterations) if iterations else None
            start = time.perf_counter()
            fit = fit_and_predict_maps(maps, request, False, 1000, 1e-9, False)
        except CGConvergenceError:
            return {"side": side, "tasks": n_tasks, "pattern": pattern, "path": path, "missing": missing,
                    "failed": True}
    return {
        "side": side, "tasks": n_tasks, "pattern": pattern, "path": path, "missing": missing, "mll_grad_s": per_eval,
        "cg_iterations": first, "cg_iterations_fit": max(iterations) if iterations else None,
        "reconstruct_s": time.perf_counter() - start, "fit_iterations": fit.hyperparameters["iterations"],
        "fit_message": fit.hyperparameters["optimizer_message"],
        "warm_start_iterations": fit.hyperparameters.get("warm_start_iterations"),
        "lengthscale_px": fit.hyperparameters["lengthscale_px"][0].tolist(),
        "log_likelihood": float(fit.hyperparameters["log_likelihood"].sum()),
        "variance": _variance_label(fit.hyperparameters),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _variance_label(hyper: dict) -> str:
    """``exact``, ``MC`` (drawn) or ``winC`` (windows of ``C`` length scales, within their stated bound)."""
    if "variance_samples" in hyper:
        return "MC"
    margin = hyper.get("variance_window_lengthscales")
    return "exact" if margin is None else f"win{margin:g}"


HEADER = (
    " grid   T  mask               missing  path      | MLL+grad  CG its   | fit + 2× pred  iter  var   | peak RSS |"
    " vs complete\n"
    "                                                 |   (s)   first max  |       (s)                 |     (MB) |"
    "  per eval\n"
    + "-" * 123
)


def _format_row(r: dict, baseline: float) -> str:
    case = f"{r['side']:>4}² {r['tasks']:>3}  {r['pattern']:<18} {r['missing']:>7}  {r['path']:<9} | "
    if r.get("failed"):
        return case + "failed: CG did not converge"
    if r.get("refused"):
        return case + "refused: " + r["refused"]
    cg = f"{r['cg_iterations']:>3} {r['cg_iterations_fit']:>4}" if r["cg_iterations"] is not None else "  —    —"
    return (
        case +
        f"{r['mll_grad_s']:8.3f}  {cg}  | {r['reconstruct_s']:10.1f}   {r['fit_iterations']:>5}  {r['variance']:<5} | "
        f"{r['peak_rss_mb']:8.0f} | {r['mll_grad_s'] / baseline:8.1f}×"
        + ("  (fit stopped: CG failed at a trial point)" if "CG did not converge" in r["fit_message"] else "")
        + (f"  (warm start: {r['warm_start_iterations']} its on a complete rectangle)"
           if r.get("warm_start_iterations") is not None else "")
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="48² × 3 maps only (about two minutes)")
    parser.add_argument("--sides", type=int, nargs="+", help="scan sides (default 64 128)")
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS + SPARSE_PATTERNS,
                        help="mask patterns (default all but the sparse scan)")
    parser.add_argument("--maps", type=int, default=6, help="maps T (default 6)")
    parser.add_argument("--device", default="cpu", help='torch device, "cpu" (default) or "cuda"')
    parser.add_argument("--kernel", default="separable", choices=("separable", "matern"), help="spatial kernel")
    parser.add_argument("--case", nargs=3, metavar=("SIDE", "T", "PATTERN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # child process: one case, JSON on stdout
        side, n_tasks, pattern = args.case
        print(json.dumps(run_case(int(side), int(n_tasks), pattern, args.device, args.kernel)))
        return 0

    import torch

    cases = [(48, 3)] if args.quick else [(side, args.maps) for side in (args.sides or (64, 128))]
    patterns = ["complete"] + [p for p in (args.patterns or PATTERNS) if p != "complete"]
    where = f"{torch.get_num_threads()} threads"
    if args.device != "cpu":
        where = torch.cuda.get_device_name(args.device)
    kernel = "separable" if args.kernel == "separable" else "non-separable"
    print(f"float64, torch {torch.__version__}, {where}; parallel GP, rank-1 B, {kernel} Matérn-5/2, solver='auto'")
    print(HEADER)
    for side, n_tasks in cases:
        baseline = None
        for pattern in patterns:
            cmd = [sys.executable, __file__, "--case", str(side), str(n_tasks), pattern, "--device", args.device,
                   "--kernel", args.kernel]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            baseline = baseline or row["mll_grad_s"]
            print(_format_row(row, baseline), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
