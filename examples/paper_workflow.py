"""The method paper's workflow, end to end, on a synthetic atomic-resolution EELS image.

1. a Poisson-noisy spectrum image of a perovskite (Mn L2,3, Ti L2,3, O K edges) with a
   few planted outlier spectra (cosmic rays), found and replaced;
2. a scree plot (SVD) to choose the number of components, then NMF with 12;
3. a length-scale scan of the first 6 NMF maps and the bounds it suggests;
4. independent vs parallel GP reconstructions of those maps with those bounds (note
   how the parallel GP lends the lattice to the noise-like maps: read the weak maps
   of a parallel fit with care);
5. the upsampled, denoised spectrum image from all 12 maps, each with its own GP (so
   that it keeps all the counts and no map borrows structure): an edge map and a
   spectrum with its band.

Every figure is written as a PNG to the output folder given on the command line::

    python examples/paper_workflow.py figures/              # 48×48 scan, a few minutes on 2 cores
    python examples/paper_workflow.py figures/ --size 16 --channels 80   # seconds
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import hyperspy.api as hs  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hyperspy_gp import gp_reconstruct  # noqa: E402
from hyperspy_gp.outliers import remove_spatial_outliers  # noqa: E402
from hyperspy_gp.plotting import plot_history, plot_spectrum_with_band  # noqa: E402
from hyperspy_gp.synthetic import atomic_eels_spectrum_image  # noqa: E402

_log = logging.getLogger("paper_workflow")

#: Energy window (eV) of the Ti L2,3 edge used for the edge maps.
TI_WINDOW = (455.0, 470.0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="folder for the figures (created if needed)")
    parser.add_argument("--size", type=int, default=48, help="scan side in pixels (default 48)")
    parser.add_argument("--channels", type=int, default=300, help="energy channels from 400 eV (default 300)")
    parser.add_argument("--nmf", type=int, default=12, help="NMF components (default 12)")
    parser.add_argument("--maps", type=int, default=6, help="NMF maps reconstructed by the GP (default 6)")
    parser.add_argument("--upsampling", type=int, default=2, help="upsampling of the final image (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(format="%(message)s")
    _log.setLevel(logging.INFO)
    hs.preferences.General.show_progressbar = False
    args.output.mkdir(parents=True, exist_ok=True)

    raw = _data_with_outliers(args.size, args.channels, args.seed)
    s = remove_spatial_outliers(raw)
    _save(_outlier_figure(raw, s), args.output, "1_outliers")

    _save(_scree_figure(s), args.output, "2_scree")
    s.decomposition(algorithm="NMF", output_dimension=args.nmf, max_iter=1000, random_state=args.seed,
                    print_info=False)
    _save(_loadings_figure(s, args.nmf), args.output, "3_nmf_loadings")

    chosen = list(range(args.maps))
    scan = s.gp_lengthscale_scan(components=chosen, show_progressbar=False)
    _save(scan.plot(), args.output, "4_lengthscale_scan")
    bounds = scan.suggestion
    _log.info("Length-scale basins (px, map × axis):\n%s", np.round(scan.basins, 2))
    _log.info("Suggested lengthscale_bounds: %s px", bounds)

    recs = {mode: gp_reconstruct(s, components=chosen, mode=mode, lengthscale_bounds=bounds,
                                 show_progressbar=False) for mode in ("independent", "parallel")}
    _save(_comparison_figure(s, recs, chosen), args.output, "5_independent_vs_parallel")
    _save(plot_history(recs["parallel"]), args.output, "6_training_history_parallel")

    # Every component goes into the final image, so that it keeps all the counts, each
    # with its own GP: in a parallel GP the noise-like maps borrow the lattice (figure 5).
    up = gp_reconstruct(s, components=args.nmf, mode="independent", lengthscale_bounds=bounds,
                        upsampling=args.upsampling, show_progressbar=False)
    _save(_edge_map_figure(raw, up), args.output, "7_upsampled_edge_map")
    _save(plot_spectrum_with_band(up, original=s), args.output, "8_upsampled_spectrum")
    _log.info("Upsampled spectrum image: %s", up.signal)
    return 0


# --------------------------------------------------------------------------- data


def _data_with_outliers(size: int, channels: int, seed: int):
    """The synthetic image with three cosmic-ray spectra planted (a bright spike each)."""
    s = atomic_eels_spectrum_image(shape=(size, size), n_channels=channels, seed=seed, signal_type="EELS_GP")
    rng = np.random.default_rng(seed)
    pixels = rng.choice(size * size, 3, replace=False)
    for index in pixels:
        y, x = divmod(int(index), size)
        channel = rng.integers(channels // 4, channels)
        s.data[y, x, channel : channel + 3] += 50 * s.data[y, x].mean()
    _log.info("Planted outliers at %s", [divmod(int(i), size) for i in pixels])
    return s


# ------------------------------------------------------------------------ figures


def _save(fig, folder: Path, name: str) -> None:
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    _log.info("wrote %s", path)


def _outlier_figure(raw, cleaned):
    mask = cleaned.metadata.Spatial_outliers.mask
    panels = [
        (raw.sum(-1).data, "total counts, raw"),
        (np.asarray(mask, dtype=float), f"replaced pixels ({int(np.sum(mask))})"),
        (cleaned.sum(-1).data, "total counts, outliers replaced"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4), layout="constrained")
    for ax, (image, title) in zip(axes, panels):
        ax.imshow(image, cmap="gray" if "replaced pixels" in title else "viridis")
        ax.set_title(title, fontsize="small")
        ax.set_axis_off()
    return fig


def _scree_figure(s):
    """Explained variance of an SVD of a copy (NMF has no explained variance).

    Here about three components stand above the noise floor.  As in the paper, NMF
    keeps more (12) so that weak signals are not forced into the main maps; the GP
    then works on the first few.
    """
    svd = s.deepcopy()
    svd.decomposition(algorithm="SVD", normalize_poissonian_noise=True, print_info=False)
    ax = svd.plot_scree_plot(n=min(30, svd.axes_manager.signal_size))
    ax.set_title("Scree plot (SVD, Poisson-normalised): components above the noise floor")
    return ax.figure


def _loadings_figure(s, n: int):
    loadings = s.get_decomposition_loadings().data
    per_row = min(n, 6)
    n_rows = -(-n // per_row)
    fig, axes = plt.subplots(n_rows, per_row, figsize=(2.0 * per_row, 2.2 * n_rows), layout="constrained",
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            ax.imshow(loadings[i], cmap="viridis")
            ax.set_title(f"NMF {i}", fontsize="small")
    fig.suptitle("NMF loading maps")
    return fig


def _comparison_figure(s, recs: dict, components: list[int]):
    nmf = s.get_decomposition_loadings().data
    n_maps = len(components)
    fig, axes = plt.subplots(n_maps, 3, figsize=(7.5, 2.3 * n_maps), layout="constrained", squeeze=False)
    for i, component in enumerate(components):
        row = [(nmf[component], f"NMF map {component}")]
        for mode, rec in recs.items():
            ls = rec.hyperparameters["lengthscale_px"][i]
            row.append((rec.loadings.data[i], f"{mode} GP, ℓ = {ls[0]:.2g}, {ls[1]:.2g} px"))
        vmin, vmax = np.percentile(nmf[component], [1, 99])
        for ax, (image, title) in zip(axes[i], row):
            ax.imshow(image, vmin=vmin, vmax=vmax, cmap="viridis")
            ax.set_title(title, fontsize="small")
            ax.set_axis_off()
    bounds = recs["parallel"].signal.metadata.GP_reconstruction.settings.lengthscale_bounds
    fig.suptitle(f"Independent vs parallel GP, lengthscale_bounds = {bounds}")
    return fig


def _edge_map_figure(raw, up):
    lo, hi = TI_WINDOW
    raw_map = raw.isig[lo:hi].sum(-1).data
    gp_map = up.signal.isig[lo:hi].sum(-1)
    gp_map = np.asarray(gp_map.data.compute() if up.signal._lazy else gp_map.data)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), layout="constrained")
    for ax, image, title in zip(axes, (raw_map, gp_map),
                                (f"raw, {raw_map.shape[0]}×{raw_map.shape[1]}",
                                 f"{up.signal.metadata.GP_reconstruction.settings.mode} GP, "
                                 f"{gp_map.shape[0]}×{gp_map.shape[1]}")):
        ax.imshow(image, cmap="inferno")
        ax.set_title(title, fontsize="small")
        ax.set_axis_off()
    fig.suptitle(f"Ti L2,3 counts, {lo:g}-{hi:g} eV")
    return fig


if __name__ == "__main__":
    sys.exit(main())
