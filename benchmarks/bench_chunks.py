"""Benchmark of the iterative path's chunked prediction: rows at a time against the whole grid at once.

Prints one table: for each scan size, number of maps T and length scale, the iterative
path's prediction at 2× upsampling (``kernel="matern"``, windowed variance) computed
as ``gp_reconstruct`` runs it, dask tasks of the posterior's default chunk of rows, and,
as the baseline in the same process, one task for the whole grid (how every grid was
computed before chunking).  Columns: the seconds and the peak RSS above the process's
RSS before the step (the kernel's high-water mark, reset through
``/proc/self/clear_refs``) of the variance's parts (computed once per grid, shared by
both), of the whole grid and of the chunks; the chunk's rows and the mean's halo; the
size of the outputs themselves (mean and variance, float64, held by both); and the
largest difference between the two means relative to the largest mean (the variances
are the same numbers).

Each chunk hands the memory it freed back to the system
(:func:`hyperspy_gp.memory.release_freed_memory`), else glibc's malloc would keep
arrays under its dynamic mmap threshold (up to 32 MB) in each thread's heap and the
chunks' peak RSS would count every chunk computed; ``MALLOC_MMAP_THRESHOLD_=65536``
returns every array when freed, to measure the arrays the chunks hold at once.

The models are the iterative path's default start with the length scale of the row,
conditioned on the synthetic lattice maps of ``bench_engine.synthetic_maps``.
Prediction only, no fit.

Usage::

    python benchmarks/bench_chunks.py            # 256², 512², 1024² × 12 at 2× and 4× (about 4 minutes on 2 cores)
    python benchmarks/bench_chunks.py --quick    # 128² × 6 (under a minute)
    python benchmarks/bench_chunks.py --sizes 384 --tasks 6 --lengthscales 2 4
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import synthetic_maps
from bench_large import _peak_mb, _reset_peak

from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.model import GridICMModel
from hyperspy_gp.gp.prediction import make_posterior


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _trim() -> None:
    """Hand freed memory back to the kernel, so that a step's RSS does not start with the last one's."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _measured(function):
    """``function()``, its seconds and its peak RSS above the RSS before it (MB)."""
    _trim()
    _reset_peak()
    before, start = _rss_mb(), time.perf_counter()
    result = function()
    return result, time.perf_counter() - start, _peak_mb() - before


def run_case(side: int, n_tasks: int, lengthscale: float, upsampling: int = 2) -> dict:
    kernel = GridKernel((side, side), "matern")
    model = GridICMModel(kernel, 1, n_tasks, rank=1, iterative=True)
    model.reset_parameters(lengthscale)
    targets = torch.as_tensor(synthetic_maps(side, n_tasks))[None]
    coords = [kernel.axis_coordinates(side, upsampling)] * 2
    n_rows = len(coords[0])

    def parts():
        posterior = make_posterior(model, targets, test_coords=coords)
        if posterior.window_lengthscales is not None:
            posterior._windowed_variance(upsampling)
        return posterior

    posterior, parts_s, parts_mb = _measured(parts)
    out = {"side": side, "tasks": n_tasks, "lengthscale": lengthscale, "upsampling": upsampling, "parts_s": parts_s,
           "parts_mb": parts_mb,
           "path": "MC" if posterior.window_lengthscales is None else
           "exact" if posterior.variance_is_exact else f"win{posterior.window_lengthscales:g}",
           "halo": posterior.halo * upsampling, "output_mb": 2 * n_tasks * n_rows**2 * 8 / 2**20}
    chunk = posterior.default_chunk_rows(coords)
    results = {}
    for name, rows in (("chunks", chunk), ("whole", n_rows)):  # (any memory kept favours the baseline)
        results[name], out[f"{name}_s"], out[f"{name}_mb"] = _measured(
            lambda rows=rows: posterior.predict_arrays(coords, chunk_rows=rows))
    out["rows"] = chunk
    whole, chunks = (torch.as_tensor(results[n][0]) for n in ("whole", "chunks"))
    out["mean_difference"] = float((whole - chunks).abs().max() / whole.abs().max())
    variances = [torch.as_tensor(results[n][1]) for n in ("whole", "chunks")]
    out["same_variance"] = bool(torch.equal(*variances))
    return out


HEADER = ("  grid  T   ℓ  u  var   | parts: s     MB | whole: s     MB | chunks: rows halo    s     MB | output MB |"
          " mean diff  same var\n")


def format_row(r: dict) -> str:
    return (f"{r['side']:4d}² {r['tasks']:2d} {r['lengthscale']:3g} {r['upsampling']:2d}  {r['path']:5s} | "
            f"{r['parts_s']:8.1f} {r['parts_mb']:6.0f} | {r['whole_s']:8.1f} {r['whole_mb']:6.0f} | "
            f"{r['rows']:12d} {r['halo']:4d} {r['chunks_s']:6.1f} {r['chunks_mb']:6.0f} | {r['output_mb']:9.0f} | "
            f"{r['mean_difference']:9.1e}  {'yes' if r['same_variance'] else 'NO'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="128² × 6 at 3 px only")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--tasks", type=int, nargs="+", default=[12])
    parser.add_argument("--lengthscales", type=float, nargs="+", default=[3.0])
    parser.add_argument("--upsampling", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args(argv)
    sizes, tasks = ([128], [6]) if args.quick else (args.sizes, args.tasks)
    torch.set_default_dtype(torch.float64)
    run_case(64, 2, 3.0)  # first calls (libraries' set-up) outside the table
    print(HEADER + "-" * (len(HEADER) - 1), flush=True)
    for side in sizes:
        for n_tasks in tasks:
            for lengthscale in args.lengthscales:
                for upsampling in args.upsampling:
                    print(format_row(run_case(side, n_tasks, lengthscale, upsampling)), flush=True)


if __name__ == "__main__":
    main()
