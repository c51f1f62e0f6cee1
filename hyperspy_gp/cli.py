"""``hyperspy-gp``: GP reconstruction of spectrum images from the command line.

Two subcommands: ``demo`` (synthetic atomic-resolution EELS, end to end) and
``reconstruct`` (any spectrum image or line scan HyperSpy can load).  Each writes
the reconstructed spectrum image (``.zspy``), the GP loading maps with their
predictive variance (``.hspy``) and a summary figure (``.png``) and prints what
it did.  Errors from bad input are reported on one line, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hyperspy_gp._hyperspy import has_decomposition, navigation_shape

PROG = "hyperspy-gp"
DEFAULT_OUT = "hyperspy_gp_output"
#: Decomposition used by ``demo``.  On the synthetic data (Poisson counts) SVD with
#: Poisson normalisation gives atomic length scales (~3 px), low noise on the signal
#: maps, and components beyond the third fitted as pure noise, so the result does not
#: depend on the number of components; plain NMF puts length scales on the 0.5 px
#: bound and noise on its floor, NMF with Poisson normalisation splits components.
DEMO_DECOMPOSITION = {"algorithm": "SVD", "normalize_poissonian_noise": True}
#: Fitted noise σ / map σ above which a map is reported as noise.
NOISE_DOMINATED = 0.9

DESCRIPTION = """\
Gaussian-process reconstruction of spectrum-image decomposition loading maps.

The loading maps of a decomposition (SVD, NMF, ...) are fitted with a Gaussian
process on the scan grid, giving denoised, optionally upsampled maps with a
predictive uncertainty, and a reconstructed spectrum image.
"""
EPILOG = """\
Examples:
  hyperspy-gp demo -o demo_output
  hyperspy-gp reconstruct EELS_SI.dm4 --components 4 -o output

Run "hyperspy-gp COMMAND --help" for the options of each command.
"""
DEMO_DESCRIPTION = """\
Make a synthetic atomic-resolution EELS spectrum image of a perovskite (Ti L2,3,
O K and Mn L2,3 edges between 400 and 700 eV, Poisson noise), decompose it with
HyperSpy (SVD with Poisson noise normalisation), reconstruct the loading maps
with a Gaussian process and write:
  OUT/demo_reconstruction.zspy  reconstructed spectrum image
  OUT/demo_loadings.hspy        GP loading maps (variance in their metadata)
  OUT/demo_summary.png          original vs GP maps, uncertainty, spectra
Existing files of these names are overwritten.
"""
DEMO_EPILOG = """\
Example:
  hyperspy-gp demo --size 64 --components 3 --upsampling 3 -o demo_output
"""
RECONSTRUCT_DESCRIPTION = """\
Load FILE with HyperSpy (any format it reads: .dm3, .dm4, .hspy, .zspy, ...),
decompose it unless the file already holds decomposition results (these are
reused; --redecompose forces a new one), reconstruct the first N loading maps
with a Gaussian process and write:
  OUT/<stem>_gp.zspy           reconstructed spectrum image
  OUT/<stem>_gp_loadings.hspy  GP loading maps (variance in their metadata)
  OUT/<stem>_gp_summary.png    original vs GP maps, uncertainty, spectra
FILE must be a spectrum image or a line scan (one or two navigation axes).
Integer data are converted to floating point before the decomposition.
Existing files of these names are overwritten.
"""
RECONSTRUCT_EPILOG = """\
Example:
  hyperspy-gp reconstruct EELS_SI.dm4 --components 4 --upsampling 2 -o output
  hyperspy-gp reconstruct scan.hspy --components 3 --algorithm NMF --mode independent
"""


class InputError(ValueError):
    """Bad input found by the command line tool itself (reported, exit status 2)."""


@dataclass
class Report:
    """What a run did, for the printed summary."""

    lines: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, text: str) -> None:
        self.lines.append(text)

    def timed(self, name: str, start: float) -> None:
        self.timings[name] = time.perf_counter() - start


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run ``hyperspy-gp`` with the arguments ``argv`` (default ``sys.argv[1:]``).

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments without the program name.

    Returns
    -------
    int
        Exit status: 0 on success, 2 for bad input (the error is printed on
        stderr as ``hyperspy-gp: error: <message>``).

    Examples
    --------
    >>> main(["--version"])  # doctest: +ELLIPSIS
    hyperspy-gp ...
    0
    """
    _use_agg_backend()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return 0 if exc.code is None else int(exc.code)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.lengthscale_bounds = _lengthscale_bounds(args.lengthscale_bounds)
        return args.run(args)
    except (ValueError, OSError, NotImplementedError) as exc:  # InputError is a ValueError
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _use_agg_backend() -> None:
    """Headless figures: select Agg before HyperSpy (or anything else) imports pyplot."""
    import matplotlib

    matplotlib.use("Agg")


def _one_line(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename:
        text = f"{exc.filename}: no such file"
    return " ".join(text.split())


def build_parser() -> argparse.ArgumentParser:
    """The ``hyperspy-gp`` argument parser with its ``demo`` and ``reconstruct`` commands.

    Returns
    -------
    argparse.ArgumentParser
        The parser :func:`main` uses; each command's ``--help`` has a description
        and an example line.

    Examples
    --------
    >>> parser = build_parser()
    >>> args = parser.parse_args(["reconstruct", "scan.dm4", "--components", "3"])
    >>> args.command, args.file, args.components, args.mode, args.upsampling
    ('reconstruct', 'scan.dm4', 3, 'parallel', 2)
    """
    from hyperspy_gp import __version__

    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    _add_demo_parser(commands)
    _add_reconstruct_parser(commands)
    return parser


def _add_demo_parser(commands) -> None:
    p = commands.add_parser("demo", help="synthetic atomic-resolution EELS, end to end",
                            description=DEMO_DESCRIPTION, epilog=DEMO_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", default=DEFAULT_OUT, metavar="OUT",
                   help=f"output folder (default: ./{DEFAULT_OUT})")
    p.add_argument("--size", type=_positive_int, default=48, help="scan size in pixels, square (default: 48)")
    p.add_argument("--channels", type=_positive_int, default=300,
                   help="energy channels spanning 400-700 eV (default: 300)")
    p.add_argument("--components", type=_positive_int, default=4,
                   help="decomposition components to reconstruct (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson noise (default: 0)")
    _add_gp_options(p)
    p.set_defaults(run=_run_demo)


def _add_reconstruct_parser(commands) -> None:
    p = commands.add_parser("reconstruct", help="reconstruct a spectrum image file",
                            description=RECONSTRUCT_DESCRIPTION, epilog=RECONSTRUCT_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="spectrum image or line scan to load with hs.load")
    p.add_argument("-o", "--output", default=DEFAULT_OUT, metavar="OUT",
                   help=f"output folder (default: ./{DEFAULT_OUT})")
    p.add_argument("--components", type=_positive_int, required=True, metavar="N",
                   help="reconstruct the first N decomposition components")
    p.add_argument("--algorithm", default="SVD",
                   help="s.decomposition algorithm: SVD, MLPCA, sklearn_pca, NMF, ... (default: SVD)")
    p.add_argument("--normalize-poissonian-noise", action=argparse.BooleanOptionalAction, default=None,
                   help="weight the decomposition for Poisson (counting) noise; default: on when "
                        "the data have no negative values")
    p.add_argument("--redecompose", action="store_true",
                   help="decompose again even if FILE holds decomposition results")
    p.add_argument("--signal-type", default=None,
                   help='signal type to load FILE as, e.g. "EELS" (default: from the file)')
    _add_gp_options(p)
    p.set_defaults(run=_run_reconstruct)


def _add_gp_options(p: argparse.ArgumentParser) -> None:
    from hyperspy_gp.request import MODES

    gp = p.add_argument_group("Gaussian process")
    gp.add_argument("--mode", choices=MODES, default="parallel",
                    help="parallel: one multi-output GP sharing spatial structure across maps; "
                         "independent: one GP per map (default: parallel)")
    gp.add_argument("--upsampling", type=_positive_int, default=2,
                    help="integer factor of the output scan density (default: 2)")
    gp.add_argument("--lengthscale-bounds", type=_bound, nargs="+", metavar="BOUND", default=None,
                    help='two numbers LO HI: bounds of the GP length scales in pixels of the scan; or '
                         '"auto" to choose them with a length-scale scan (default: >= 0.5)')
    gp.add_argument("--device", default="cpu", help='torch device, "cpu" or "cuda" (default: cpu)')
    gp.add_argument("--quiet", action="store_true", help="no progress bars")


def _bound(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of pixels nor 'auto'") from None


def _lengthscale_bounds(values: list | None) -> tuple[float, float] | str | None:
    """``--lengthscale-bounds`` as ``gp_reconstruct`` takes it: two numbers or ``"auto"``."""
    if values is None:
        return None
    if values == ["auto"]:
        return "auto"
    if len(values) != 2 or "auto" in values:
        raise InputError(f"--lengthscale-bounds takes two numbers LO HI or the word auto, not {' '.join(map(str, values))}.")
    return tuple(values)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------


def _run_demo(args) -> int:
    from hyperspy_gp.synthetic import atomic_eels_spectrum_image

    report, start = Report(), time.perf_counter()
    t0 = time.perf_counter()
    signal = atomic_eels_spectrum_image(shape=(args.size, args.size), n_channels=args.channels,
                                        energy_scale=300.0 / args.channels, seed=args.seed)
    report.timed("synthetic data", t0)
    report.add(f"Synthetic data: {_describe(signal)}, seed {args.seed}")
    _decompose(signal, args.components, report, **DEMO_DECOMPOSITION)
    paths = _reconstruct_and_write(signal, args, Path(args.output), "demo_reconstruction",
                                   "demo_loadings", "demo_summary", report)
    _print_report(report, paths, time.perf_counter() - start)
    return 0


def _run_reconstruct(args) -> int:
    report, start = Report(), time.perf_counter()
    t0 = time.perf_counter()
    signal = _load(Path(args.file), args.signal_type)
    report.timed("loading", t0)
    report.add(f"Loaded {args.file}: {_describe(signal)}")
    _check_navigation(signal, args.file)

    if has_decomposition(signal) and not args.redecompose:
        lr = signal.learning_results
        report.add(f"Decomposition: reusing the one stored in the file ({lr.decomposition_algorithm}, "
                   f"{lr.loadings.shape[1]} components; --redecompose to run a new one)")
    else:
        signal = _as_float(signal, report)
        poisson = _poisson_choice(signal, args.normalize_poissonian_noise, report)
        _decompose(signal, args.components, report, algorithm=args.algorithm,
                   normalize_poissonian_noise=poisson)
    stem = Path(args.file).stem
    paths = _reconstruct_and_write(signal, args, Path(args.output), f"{stem}_gp", f"{stem}_gp_loadings",
                                   f"{stem}_gp_summary", report)
    _print_report(report, paths, time.perf_counter() - start)
    return 0


# --------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------


def _load(path: Path, signal_type: str | None):
    """``hs.load`` one signal from ``path``."""
    import hyperspy.api as hs

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    loaded = hs.load(path, signal_type=signal_type)
    if isinstance(loaded, list):
        spectra = [s for s in loaded if s.axes_manager.signal_dimension == 1]
        if len(spectra) != 1:
            raise InputError(f"{path} holds {len(loaded)} signals, {len(spectra)} of them spectra; "
                             "save the spectrum image alone (s.save) and pass that file.")
        loaded = spectra[0]
    return loaded


def _check_navigation(signal, name) -> None:
    """Fail early (before a decomposition) on data with no scan grid."""
    if signal.axes_manager.signal_dimension != 1:
        raise InputError(f"{name} is not a spectrum image (signal dimension "
                         f"{signal.axes_manager.signal_dimension}); load it with the energy axis as "
                         "the signal axis.")
    n_nav = signal.axes_manager.navigation_dimension
    if n_nav == 0:
        raise InputError(f"{name} is a single spectrum (no navigation axes): there is no scan grid "
                         "to reconstruct over. Give a line scan or a spectrum image.")
    if n_nav > 2:
        raise InputError(f"{name} has {n_nav} navigation axes; the GP reconstruction supports 1 or 2.")


def _as_float(signal, report: Report):
    """A floating-point copy of integer data (HyperSpy's decomposition refuses integers)."""
    dtype = signal.data.dtype
    if not np.issubdtype(dtype, np.integer):
        return signal
    target = "float32" if dtype.itemsize <= 2 else "float64"
    converted = signal.deepcopy()
    converted.change_dtype(target)
    report.add(f"Data type: {dtype} converted to {target} (a copy) for the decomposition")
    return converted


def _poisson_choice(signal, requested: bool | None, report: Report) -> bool:
    """Poisson noise normalisation: as requested, else on for non-negative data."""
    if requested is not None:
        return requested
    negative = bool(np.nanmin(signal.data) < 0)
    if negative:
        report.add("Poisson noise normalisation: off (the data have negative values)")
    return not negative


def _decompose(signal, n_components: int, report: Report, algorithm: str,
               normalize_poissonian_noise: bool) -> None:
    """``signal.decomposition`` in place; SVD keeps every component (full scree)."""
    t0 = time.perf_counter()
    options = {} if algorithm == "SVD" else {"output_dimension": n_components}
    signal.decomposition(algorithm=algorithm, normalize_poissonian_noise=normalize_poissonian_noise,
                         print_info=False, **options)
    report.timed("decomposition", t0)
    text = f"Decomposition: {algorithm}"
    text += " with Poisson noise normalisation" if normalize_poissonian_noise else ""
    evr = _explained_variance_ratio(signal, n_components + 1)
    if evr is not None:
        text += "; explained variance ratio of components 0-" + str(len(evr) - 1) + ": "
        text += ", ".join(f"{v:.3g}" for v in evr)
    report.add(text)


def _explained_variance_ratio(signal, n: int):
    ev = signal.learning_results.explained_variance
    if ev is None or len(ev) == 0:
        return None
    ev = np.asarray(ev, dtype=float)
    return ev[:n] / ev.sum()


def _reconstruct_and_write(signal, args, out_dir: Path, signal_stem: str, loadings_stem: str,
                           figure_stem: str, report: Report) -> list[Path]:
    from hyperspy_gp.reconstruct import gp_reconstruct

    t0 = time.perf_counter()
    rec = gp_reconstruct(signal, components=args.components, mode=args.mode, upsampling=args.upsampling,
                         lengthscale_bounds=args.lengthscale_bounds, device=args.device,
                         show_progressbar=False if args.quiet else None)
    report.timed("GP fit + prediction", t0)
    _report_fit(signal, rec, args, report)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = [out_dir / f"{signal_stem}.zspy", out_dir / f"{loadings_stem}.hspy"]
    rec.signal.save(paths[0], overwrite=True)
    rec.loadings.save(paths[1], overwrite=True)
    report.timed("writing signals", t0)
    t0 = time.perf_counter()
    paths.append(_write_figure(signal, rec, out_dir / f"{figure_stem}.png"))
    report.timed("summary figure", t0)
    return paths


def _write_figure(signal, rec, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from hyperspy_gp.plotting import plot_reconstruction_summary

    fig = plot_reconstruction_summary(signal, rec)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------
# Printed summary
# --------------------------------------------------------------------------


def _describe(signal) -> str:
    am = signal.axes_manager
    nav = " × ".join(f"{a.size} {a.name}" for a in am.navigation_axes[::-1])
    sig = am.signal_axes[0] if am.signal_dimension == 1 else None
    energy = f"{sig.size} channels ({sig.axis[0]:.4g}-{sig.axis[-1]:.4g} {sig.units})" if sig else ""
    pixel = ", ".join(f"{a.scale:.4g} {a.units}" for a in am.navigation_axes[::-1])
    scan = f"scan {nav} pixels (pixel size {pixel})" if pixel else "no scan (a single spectrum)"
    return f"{type(signal).__name__} '{signal.metadata.General.title}', {scan}, {energy}, {signal.data.dtype}"


def _report_fit(signal, rec, args, report: Report) -> None:
    hyper = rec.hyperparameters
    components = list(rec.loadings.metadata.GP_reconstruction.settings.components)
    shape = " × ".join(str(n) for n in navigation_shape(rec.signal))
    report.add(f"GP: {args.mode} mode, components {components}, upsampling ×{args.upsampling} "
               f"-> scan {shape} pixels")
    names = ", ".join(hyper["axes_names"])
    units = hyper["axes_units"]
    maps = _loading_maps(signal, components)
    scan_px = np.array(navigation_shape(signal))
    for row, component in enumerate(components):
        lengthscale = np.atleast_1d(hyper["lengthscale_px"][row])
        px = " × ".join(f"{v:.3g}" for v in lengthscale)
        cal = " × ".join(_length_text(v, u) for v, u in zip(hyper["lengthscale_calibrated"][row], units))
        noise = float(hyper["noise_variance"][row])
        spread = maps[:, row].std()
        ratio = np.sqrt(noise) / spread if spread > 0 else float("nan")
        remarks = "".join(f" - {r}" for r in _fit_remarks(lengthscale, ratio, _fitted_bounds(rec), scan_px))
        report.add(f"  component {component}: length scale ({names}) {px} px = {cal}; "
                   f"noise variance {noise:.3g} (noise σ / map σ = {ratio:.2g}){remarks}")
    state = "converged" if hyper["converged"] else "NOT converged (iteration cap reached)"
    report.add(f"  optimiser: {hyper['iterations']} iterations, {state}; "
               f"log likelihood {float(np.sum(hyper['log_likelihood'])):.6g}")


def _length_text(value: float, units: str) -> str:
    """``value`` in nm when ``units`` is a length unit, else as calibrated."""
    from hyperspy_gp.plotting import LENGTH_UNITS

    if units in LENGTH_UNITS:
        return f"{value * LENGTH_UNITS[units] / LENGTH_UNITS['nm']:.3g} nm"
    return f"{value:.3g} {units}".rstrip()


def _fitted_bounds(rec) -> tuple[float | None, float | None] | None:
    """The length-scale bounds the fit used (after ``"auto"`` chose them)."""
    bounds = rec.signal.metadata.GP_reconstruction.settings.lengthscale_bounds
    if isinstance(bounds, str):
        return None
    return tuple(None if np.isnan(b) else float(b) for b in bounds)


def _fit_remarks(lengthscale_px: np.ndarray, noise_ratio: float, bounds, scan_px: np.ndarray) -> list[str]:
    """Warnings about a component's fit a user should know when reading the numbers.

    ``scan_px``: the scan's size in pixels along the axes of ``lengthscale_px``.

    Examples
    --------
    >>> [remark.split(":")[0] for remark in _fit_remarks(np.array([312.0, 30.0]), 0.5, None, np.array([48, 48]))]
    ['length scale longer than the scan']
    >>> _fit_remarks(np.array([30.0, 30.0]), 0.5, None, np.array([48, 48]))
    []
    """
    from hyperspy_gp.gp.model import MIN_LENGTHSCALE, MIN_NOISE

    lo, hi = bounds if bounds is not None else (None, None)
    lo = MIN_LENGTHSCALE if lo is None else lo
    remarks = []
    if np.any(lengthscale_px <= lo * 1.01):
        remarks.append(f"length scale at the lower bound {lo:g} px: no spatial correlation found")
    if hi is not None and np.any(lengthscale_px >= hi * 0.99):
        remarks.append(f"length scale at the upper bound {hi:g} px")
    if np.any(lengthscale_px > scan_px):
        remarks.append("length scale longer than the scan: only slow variations kept, finer structure (atomic "
                       "columns) is smoothed away; if the map has it, use --lengthscale-bounds auto (a length-scale "
                       f"scan) or {lo:g} HI, HI near its spacing in pixels")
    if noise_ratio > NOISE_DOMINATED:
        remarks.append("the map is noise: the GP flattens it")
    elif noise_ratio**2 <= 2 * MIN_NOISE:
        remarks.append("noise at its floor: the GP interpolates the map exactly")
    return remarks


def _loading_maps(signal, components: list[int]) -> np.ndarray:
    loadings = signal.learning_results.loadings
    loadings = loadings.compute() if hasattr(loadings, "compute") else np.asarray(loadings)
    return loadings[:, components]


def _print_report(report: Report, paths: list[Path], total: float) -> None:
    for line in report.lines:
        print(line)
    print("Timings: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in report.timings.items())
          + f"; total {total:.2f} s")
    print("Wrote:")
    for path in paths:
        print(f"  {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
