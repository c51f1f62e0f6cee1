"""Benchmark of large, lazy spectrum images: decomposition, GP fit, streamed .zspy writes.

For each scan size (side² pixels × channels) and cube chunk size, one fresh process
builds the lazy synthetic atomic-resolution EELS image, runs HyperSpy's lazy SVD,
fits the parallel GP to 3 loading maps and writes the lazy 2× and 4× reconstructed
cubes (float32) to .zspy in a temporary folder, deleted afterwards.  It prints one
table: seconds per step and the peak RSS of each step (the kernel's high-water mark,
reset before each step through ``/proc/self/clear_refs``; ``ru_maxrss`` of the whole
process where that is not available).

The cube chunks follow dask's ``array.chunk-size``; two values show that the peak RSS
of a write grows with the chunk size, not with the size of the cube written.

Usage::

    python benchmarks/bench_large.py --quick            # 64² × 512, under a minute
    python benchmarks/bench_large.py --sides 128 256     # × 2048 channels
    python benchmarks/bench_large.py --sides 512 --upsampling 2 --chunk-mb 32
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICK = dict(sides=[64], channels=512, chunk_mb=[8, 32], upsampling=[2, 4])
FULL = dict(sides=[128, 256], channels=2048, chunk_mb=[32, 128], upsampling=[2, 4])


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Step:
    """Time and peak RSS of a ``with`` block."""

    def __init__(self, out: dict, name: str) -> None:
        self.out, self.name = out, name

    def __enter__(self):
        _reset_peak()
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.out[f"{self.name}_s"] = time.perf_counter() - self.start
        self.out[f"{self.name}_mb"] = _peak_mb()


def run_case(side: int, channels: int, chunk_mb: int, upsamplings: list[int]) -> dict:
    import dask
    import hyperspy.api as hs

    from hyperspy_gp import gp_reconstruct
    from hyperspy_gp.synthetic import atomic_eels_spectrum_image

    import hyperspy_gp.gp.prediction  # noqa: F401  (torch's import is not the fit's time)
    import hyperspy_gp.gp.training  # noqa: F401

    hs.preferences.General.show_progressbar = False
    out = {"side": side, "channels": channels, "chunk_mb": chunk_mb}
    s = atomic_eels_spectrum_image(shape=(side, side), n_channels=channels, seed=0, lazy=True)
    with _Step(out, "svd"):
        s.decomposition(algorithm="SVD", output_dimension=4, print_info=False)
    folder = Path(tempfile.mkdtemp(prefix="bench_large_"))
    try:
        with dask.config.set({"array.chunk-size": f"{chunk_mb}MiB"}):
            for up in upsamplings:
                with _Step(out, f"fit{up}"):
                    rec = gp_reconstruct(s, components=3, upsampling=up, lazy_output=True)
                cube = rec.signal
                cube.change_dtype("float32")
                out[f"cube{up}_gb"] = cube.data.nbytes / 1e9
                with _Step(out, f"write{up}"):
                    cube.save(folder / f"rec{up}.zspy", overwrite=True)
                out[f"disk{up}_gb"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9
                shutil.rmtree(folder / f"rec{up}.zspy")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


HEADER = (
    "  scan × channels | chunk |   SVD   RSS |  fit+pred 2×/4×  |  write 2×: GB     s    RSS |"
    "  write 4×: GB     s    RSS\n"
    "                  |  (MB) |   (s)  (MB) |        (s)       |                       (MB) |"
    "                       (MB)\n" + "-" * 118
)


def _format(r: dict, upsamplings: list[int]) -> str:
    row = (f"{r['side']:>5}² × {r['channels']:>5}   | {r['chunk_mb']:>5} | {r['svd_s']:5.1f} {r['svd_mb']:5.0f} |"
           f" {r.get('fit2_s', float('nan')):6.1f} {r.get('fit4_s', float('nan')):6.1f}    |")
    for up in (2, 4):
        if up in upsamplings:
            row += f"  {r[f'cube{up}_gb']:11.2f} {r[f'write{up}_s']:5.1f} {r[f'write{up}_mb']:6.0f} |"
        else:
            row += f"  {'—':>11} {'—':>5} {'—':>6} |"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64² × 512 only (under a minute)")
    parser.add_argument("--sides", type=int, nargs="+", help="scan sides (default 128 256)")
    parser.add_argument("--channels", type=int, help="channels (default 2048)")
    parser.add_argument("--chunk-mb", type=int, nargs="+", help="cube chunk sizes, MiB (default 32 128)")
    parser.add_argument("--upsampling", type=int, nargs="+", choices=(2, 4), help="default 2 4")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # child process: one case, JSON on the last line of stdout
        side, channels, chunk_mb, *ups = (int(v) for v in args.case.split(","))
        print(json.dumps(run_case(side, channels, chunk_mb, ups)))
        return 0

    config = dict(QUICK if args.quick else FULL)
    for key in ("sides", "channels", "chunk_mb", "upsampling"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    import os

    print(f"float32 cubes written; lazy SVD (randomized), parallel GP on 3 maps; {os.cpu_count()} CPU cores; "
          f"free disk {shutil.disk_usage(tempfile.gettempdir()).free / 1e9:.0f} GB")
    print(HEADER)
    for side in config["sides"]:
        for chunk_mb in config["chunk_mb"]:
            case = ",".join(str(v) for v in (side, config["channels"], chunk_mb, *config["upsampling"]))
            proc = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True)
            if proc.returncode:
                print(f"{side}² chunk {chunk_mb} MB failed:\n{proc.stderr[-2000:]}", flush=True)
                continue
            print(_format(json.loads(proc.stdout.strip().splitlines()[-1]), config["upsampling"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
