"""Benchmark of the exact grid GP engine against the usual GPyTorch multitask recipe.

Prints one table: for each grid size and number of maps T, the seconds per exact
marginal-likelihood + gradient evaluation, the time to fit to convergence, the time to
predict mean and exact variance at 2× and 4× upsampling, and the peak RSS of the
process that ran the case.  In the same run, where it fits in time and memory (≤ 48²),
the standard GPyTorch recipe — ``ExactGP`` + ``MultitaskKernel(MaternKernel(nu=2.5,
ard_num_dims=2), rank=1)`` + ``MultitaskGaussianLikelihood``, one Adam step on the
exact MLL — is timed per training iteration, and the ratio is printed.

With ``--kernel matern`` it prints the table of the paper's non-separable Matérn-5/2
instead: the dense eigendecomposition path where it fits (≤ 64²) and the iterative
path (FFT products, preconditioned CG, stochastic log-determinant; the variance exact,
window by window, where that is affordable, else within a stated bound by windows of a
shorter margin, else a Monte-Carlo estimate from 64 draws: the ``var`` column says
which, ``winC`` for windows of ``C`` length scales) on every size, with the CG iterations per solve and,
in the same run, the ratio of the two per evaluation.

Each case runs in a fresh subprocess so that its peak RSS is its own.

With ``--device cuda`` the engine and the GPyTorch recipe both run on the GPU (timings
synchronise the device), and the table gains the peak GPU memory that torch allocated.
``--sizes`` and ``--tasks`` choose the cases.

Usage::

    python benchmarks/bench_engine.py                  # full table (a few minutes on 2 cores)
    python benchmarks/bench_engine.py --quick          # under a minute
    python benchmarks/bench_engine.py --kernel matern  # non-separable kernel (about 20 minutes)
    python benchmarks/bench_engine.py --device cuda --sizes 48 256 1024 --tasks 12
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

import numpy as np

FULL_SIZES = (32, 48, 64, 128, 256)
FULL_TASKS = (3, 6, 12)
QUICK_SIZES = (32, 48)
QUICK_TASKS = (3, 6)
#: Largest grid side on which the GPyTorch recipe is run.
GPYTORCH_MAX_SIDE = 48
MATERN_SIZES = (32, 64, 128, 256)
MATERN_TASKS = (3, 6)
#: Largest grid side on which the dense eigendecomposition of the Matérn kernel is timed.
DENSE_MAX_SIDE = 64


def synthetic_maps(side: int, n_tasks: int, seed: int = 0) -> np.ndarray:
    """Standardised maps of a lattice with increasing noise, ``(side, side, T)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    truth = np.sin(2 * np.pi * xx / 7) * np.sin(2 * np.pi * yy / 9)
    noise = np.linspace(0.05, 1.5, n_tasks)
    maps = np.stack([truth + s * rng.standard_normal(truth.shape) for s in noise], -1)
    return (maps - maps.mean((0, 1))) / maps.std((0, 1))


@contextlib.contextmanager
def counting_cg(module):
    """Record the most iterations of each ``module.preconditioned_cg`` call; restored on exit."""
    solve, iterations = module.preconditioned_cg, []

    def counted(*args, **kwargs):
        result = solve(*args, **kwargs)
        iterations.append(int(result.iterations.max()))
        return result

    module.preconditioned_cg = counted
    try:
        yield iterations
    finally:
        module.preconditioned_cg = solve


def mll_and_grad(model, targets) -> None:
    """One likelihood + gradient evaluation of ``model``."""
    for p in model.parameters():
        p.grad = None
    model.log_likelihood(targets).sum().backward()


def _synchronize() -> None:
    """Wait for the GPU's queued work (GPU kernels run asynchronously); no-op on a CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    _synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    _synchronize()
    return (time.perf_counter() - start) / repeat


class _Clock:
    """Seconds of a ``with`` block, the GPU's queued work included."""

    def __enter__(self):
        _synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _synchronize()
        self.seconds = time.perf_counter() - self.start


def run_ours(side: int, n_tasks: int, quick: bool, device: str = "cpu") -> dict:
    import torch
    from threadpoolctl import threadpool_limits

    from hyperspy_gp.gp.kernels import GridKernel
    from hyperspy_gp.gp.model import GridICMModel
    from hyperspy_gp.gp.prediction import GridPosterior
    from hyperspy_gp.gp.training import fit_model

    targets = torch.tensor(synthetic_maps(side, n_tasks)[None], device=device)
    model = GridICMModel(GridKernel((side, side), device=device), 1, n_tasks, rank=1)
    with threadpool_limits(limits=1, user_api="blas"):
        per_eval = _timeit(lambda: mll_and_grad(model, targets), repeat=3 if quick or side >= 256 else 10)
    with _Clock() as fit_clock:
        result = fit_model(model, targets, max_iter=100 if quick else 1000)

    out = {"mll_grad_s": per_eval, "fit_s": fit_clock.seconds, "iterations": result.n_iterations}
    for up in (2, 4):
        with _Clock() as clock:
            posterior = GridPosterior(model, targets)
            coords = [model.kernel.axis_coordinates(side, up)] * 2
            for _rows, _mean, _var in posterior.predict_in_chunks(coords):
                _mean.cpu(), _var.cpu()  # the host receives every chunk, as in gp_reconstruct
        out[f"predict_{up}x_s"] = clock.seconds
    return out


def run_gpytorch(side: int, n_tasks: int, iterations: int, device: str = "cpu") -> dict:
    """Seconds per training iteration of the standard GPyTorch multitask recipe."""
    import gpytorch
    import torch

    maps = synthetic_maps(side, n_tasks)
    yy, xx = np.mgrid[:side, :side]
    x = torch.tensor(np.stack([yy.ravel(), xx.ravel()], -1), dtype=torch.float64, device=device)
    y = torch.tensor(maps.reshape(-1, n_tasks), device=device)

    class MultitaskGP(gpytorch.models.ExactGP):
        def __init__(self, likelihood):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=n_tasks)
            self.covar_module = gpytorch.kernels.MultitaskKernel(
                gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=2), num_tasks=n_tasks, rank=1
            )

        def forward(self, inputs):
            return gpytorch.distributions.MultitaskMultivariateNormal(
                self.mean_module(inputs), self.covar_module(inputs)
            )

    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=n_tasks).double().to(device)
    model = MultitaskGP(likelihood).double().to(device)
    model.train(), likelihood.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)

    def step():
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()

    return {"gpytorch_iter_s": _timeit(step, repeat=iterations)}


def run_matern(side: int, n_tasks: int, quick: bool, device: str = "cpu") -> dict:
    """The non-separable kernel: iterative path, and the dense eigen path where it fits."""
    import torch
    from threadpoolctl import threadpool_limits

    import hyperspy_gp.gp.iterative as iterative
    from hyperspy_gp.gp.kernels import GridKernel
    from hyperspy_gp.gp.model import GridICMModel
    from hyperspy_gp.gp.prediction import make_posterior
    from hyperspy_gp.gp.training import fit_model

    targets = torch.tensor(synthetic_maps(side, n_tasks)[None], device=device)
    out = {"side": side, "tasks": n_tasks}
    with counting_cg(iterative) as cg_iterations:
        for name, is_iterative in (("dense", False), ("iterative", True)):
            if not is_iterative and side > DENSE_MAX_SIDE:
                continue
            model = GridICMModel(GridKernel((side, side), "matern", device=device), 1, n_tasks, rank=1,
                                 iterative=is_iterative)
            with threadpool_limits(limits=1, user_api="blas"):
                out[f"{name}_mll_grad_s"] = _timeit(lambda model=model: mll_and_grad(model, targets),
                                                    repeat=1 if side >= 128 or name == "dense" else 3)
        out["cg_iterations"] = max(cg_iterations)
        with _Clock() as clock:
            result = fit_model(model, targets, max_iter=100 if quick else 1000)
        out["fit_s"], out["iterations"] = clock.seconds, result.n_iterations
        coords = [model.kernel.axis_coordinates(side, 2)] * 2
        with _Clock() as clock:  # as gp_reconstruct builds it: the exact variance where its windows are affordable
            posterior = make_posterior(model, targets, test_coords=coords)
            posterior.predict(coords)
        out["predict_2x_s"] = clock.seconds
        margin = posterior.window_lengthscales
        out["variance"] = "exact" if posterior.variance_is_exact else "MC" if margin is None else f"win{margin:g}"
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _format_matern_row(r: dict) -> str:
    dense = r.get("dense_mll_grad_s")
    dense_text = f"{dense:9.3f} {dense / r['iterative_mll_grad_s']:6.1f}×" if dense else f"{'—':>9} {'—':>7}"
    return (
        f"{r['side']:>4}² {r['tasks']:>3} | {r['iterative_mll_grad_s']:8.3f} {r['cg_iterations']:>4} | "
        f"{r['fit_s']:7.1f} {r['iterations']:>5} | {r['predict_2x_s']:7.1f} {r['variance']:>5} | "
        f"{r['peak_rss_mb']:8.0f} | {dense_text}"
    )


MATERN_HEADER = (
    " grid   T | iterative MLL+grad | fit (s)  iter | pred 2×  var  | peak RSS | dense eigen  speed-up\n"
    "          |    (s)  CG iters   |               |     (s)       |     (MB) | (s/eval)     per eval\n"
    + "-" * 97
)


def run_case(side: int, n_tasks: int, quick: bool, device: str = "cpu") -> dict:
    out = {"side": side, "tasks": n_tasks}
    out.update(run_ours(side, n_tasks, quick, device))
    if side <= GPYTORCH_MAX_SIDE:
        out.update(run_gpytorch(side, n_tasks, iterations=1 if quick else 2, device=device))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device != "cpu":
        import torch

        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _format_row(r: dict) -> str:
    gp = r.get("gpytorch_iter_s")
    ratio = f"{gp / r['mll_grad_s']:8.0f}×" if gp else f"{'—':>9}"
    gp_text = f"{gp:10.3f}" if gp else f"{'—':>10}"
    gpu = f" {r['peak_gpu_mb']:8.0f} |" if "peak_gpu_mb" in r else ""
    return (
        f"{r['side']:>4}² {r['tasks']:>3} | {r['mll_grad_s'] * 1e3:9.2f} | {r['fit_s']:7.2f} {r['iterations']:>5} | "
        f"{r['predict_2x_s']:7.3f} {r['predict_4x_s']:7.3f} | {r['peak_rss_mb']:8.0f} |{gpu} {gp_text} {ratio}"
    )


HEADER = (
    " grid   T | MLL+grad | fit (s)  iter | pred 2× pred 4× | peak RSS | GPyTorch   speed-up\n"
    "          |     (ms) |               |     (s)     (s) |     (MB) | (s/iter)  per eval\n"
    + "-" * 95
)
GPU_HEADER = (
    " grid   T | MLL+grad | fit (s)  iter | pred 2× pred 4× | peak RSS | peak GPU | GPyTorch   speed-up\n"
    "          |     (ms) |               |     (s)     (s) |     (MB) |     (MB) | (s/iter)  per eval\n"
    + "-" * 106
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes only (under a minute)")
    parser.add_argument("--kernel", choices=("separable", "matern"), default="separable",
                        help="separable (default) or the non-separable Matérn-5/2 (iterative path)")
    parser.add_argument("--device", default="cpu", help='torch device, "cpu" (default) or "cuda"')
    parser.add_argument("--sizes", nargs="+", type=int, metavar="SIDE", help="grid sides (default: by --quick)")
    parser.add_argument("--tasks", nargs="+", type=int, metavar="T", help="numbers of maps (default: by --quick)")
    parser.add_argument("--case", nargs=2, type=int, metavar=("SIDE", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    matern = args.kernel == "matern"

    if args.case:  # child process: one case, JSON on stdout
        row = (run_matern if matern else run_case)(*args.case, args.quick, args.device)
        print(json.dumps(row))
        return 0

    if matern:
        sizes, tasks = ((32, 48), (3,)) if args.quick else (MATERN_SIZES, MATERN_TASKS)
    else:
        sizes, tasks = (QUICK_SIZES, QUICK_TASKS) if args.quick else (FULL_SIZES, FULL_TASKS)
    sizes, tasks = args.sizes or sizes, args.tasks or tasks
    import torch

    kernel = "non-separable Matérn-5/2" if matern else "separable Matérn-5/2"
    where = f"{torch.get_num_threads()} threads"
    if args.device != "cpu":
        where = torch.cuda.get_device_name(args.device) + ("" if matern else " (GPyTorch recipe on the same GPU)")
    print(f"float64, torch {torch.__version__}, {where}; parallel GP, rank-1 B, {kernel}")
    print(MATERN_HEADER if matern else GPU_HEADER if args.device != "cpu" else HEADER)
    for side in sizes:
        for n_tasks in tasks:
            cmd = [sys.executable, __file__, "--case", str(side), str(n_tasks), "--kernel", args.kernel,
                   "--device", args.device]
            proc = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True, check=False)
            if proc.returncode:
                error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{side:>4}² {n_tasks:>3} | failed: {error}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(_format_matern_row(row) if matern else _format_row(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
