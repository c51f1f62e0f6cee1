"""The synthetic similarity benchmark of the method's paper (its Figs. 4-8).

Three ground-truth maps are built from products of sines
(:func:`hyperspy_gp.synthetic.similarity_maps`): maps 1 and 3 are identical, map 2
has its period doubled along x; all take values in [0, 1].  Gaussian noise of
standard deviations set by two numbers, ``σ0`` and ``α``, is added:

noise model 1
    ``σ = (0, α σ0, α σ0)``: map 1 is clean, maps 2 and 3 are noisy;
noise model 2
    ``σ = (σ0, α σ0, α σ0)``: map 1 is noisy too, less than the others for ``α > 1``.

Each noisy set is reconstructed with several GP configurations (independent or
parallel GPs, free length scales or hard bounds) and every reconstructed map is
compared with its noiseless truth by normalised cross-correlation (NCC, 1 = same
pattern).  Over a grid of ``(σ0, α)`` this gives one *similarity map* per GP map and
configuration.

The fits call the engine directly on arrays (the same standardisation, model and
prediction as :func:`hyperspy_gp.gp_reconstruct`, without building HyperSpy
signals).  All grid points share one standard-normal draw (scaled by their ``σ``),
so differences between neighbouring points and between configurations come from
the noise level and the GP, not from different noise realisations.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hyperspy_gp.synthetic import normalized_cross_correlation, similarity_maps

_logger = logging.getLogger(__name__)

__all__ = ["Configuration", "DEFAULT_CONFIGURATIONS", "SimilarityBenchmark", "noise_levels", "similarity_benchmark"]

NOISE_MODELS = (1, 2)
MAP_NAMES = ("map 1", "map 2", "map 3")


@dataclass(frozen=True)
class Configuration:
    """One way of reconstructing the three noisy maps.

    Attributes
    ----------
    name
        Label used in tables and figures.
    mode
        ``"independent"`` or ``"parallel"`` (see :func:`hyperspy_gp.gp_reconstruct`).
    lengthscale_bounds
        ``(lo, hi)`` hard length-scale bounds in pixels, or ``None`` for free kernels.

    Examples
    --------
    >>> Configuration("parallel, bounds [2, 5]", "parallel", (2.0, 5.0)).lengthscale_bounds
    (2.0, 5.0)
    """

    name: str
    mode: str = "parallel"
    lengthscale_bounds: tuple[float, float] | None = None


#: The paper's configurations: free kernels, bounds around the intrinsic length scale
#: of the sines ([2, 5] px) and deliberately wrong bounds ([10, 11] px), each with
#: independent and parallel GPs.
DEFAULT_CONFIGURATIONS = tuple(
    Configuration(f"{mode}, {label}", mode, bounds)
    for label, bounds in (("free", None), ("bounds [2, 5]", (2.0, 5.0)), ("bounds [10, 11]", (10.0, 11.0)))
    for mode in ("independent", "parallel")
)


def noise_levels(sigma0: float, alpha: float, noise_model: int) -> np.ndarray:
    """Noise standard deviations of maps 1-3 for one grid point.

    Parameters
    ----------
    sigma0 : float
        Base noise level ``σ0``.
    alpha : float
        Factor ``α`` of the noise of maps 2 and 3.
    noise_model : {1, 2}
        1: ``σ = (0, ασ0, ασ0)``; 2: ``σ = (σ0, ασ0, ασ0)``.

    Returns
    -------
    numpy.ndarray
        The three standard deviations.

    Raises
    ------
    ValueError
        For a noise model other than 1 or 2.

    Examples
    --------
    >>> noise_levels(0.5, 4.0, 1), noise_levels(0.5, 4.0, 2)
    (array([0., 2., 2.]), array([0.5, 2. , 2. ]))
    """
    if noise_model not in NOISE_MODELS:
        raise ValueError(f"noise_model must be 1 (σ = (0, ασ0, ασ0)) or 2 (σ = (σ0, ασ0, ασ0)), not {noise_model!r}.")
    first = 0.0 if noise_model == 1 else sigma0
    return np.array([first, alpha * sigma0, alpha * sigma0], dtype=float)


@dataclass
class SimilarityBenchmark:
    """Similarity of reconstructed and true maps over a ``(σ0, α)`` grid.

    Attributes
    ----------
    sigma0s, alphas
        The grid, ``(S,)`` and ``(A,)``.
    noise_model
        1 or 2 (see :func:`noise_levels`).
    configurations
        The GP configurations, ``C`` of them.
    similarity
        NCC of each reconstructed map with its truth, ``(C, S, A, 3)``.
    noisy_similarity
        NCC of each noisy input map with its truth (no GP), ``(S, A, 3)``.
    lengthscales
        Fitted length scales, ``(C, S, A, 3, 2)`` pixels (per map and axis).
    converged
        Whether each fit converged without a warning, ``(C, S, A)``.
    shape, period, seed
        Map size, sine periods (pixels) and noise seed.

    Examples
    --------
    >>> result = similarity_benchmark([0.2], [2.0], configurations=DEFAULT_CONFIGURATIONS[:2], shape=(16, 16))
    >>> [c.name for c in result.configurations], result.similarity.shape
    (['independent, free', 'parallel, free'], (2, 1, 1, 3))
    """

    sigma0s: np.ndarray
    alphas: np.ndarray
    noise_model: int
    configurations: list[Configuration]
    similarity: np.ndarray
    noisy_similarity: np.ndarray
    lengthscales: np.ndarray
    converged: np.ndarray
    shape: tuple[int, int]
    period: tuple[float, float]
    seed: int | None

    def index(self, name: str) -> int:
        """Position of the configuration called ``name``.

        Parameters
        ----------
        name : str
            A configuration's ``name``.

        Returns
        -------
        int
            Its index along the first axis of :attr:`similarity`.

        Raises
        ------
        ValueError
            When no configuration has that name.

        Examples
        --------
        >>> result = similarity_benchmark([0.1], [1.0], configurations=DEFAULT_CONFIGURATIONS[:2], shape=(16, 16))
        >>> result.index("parallel, free")
        1
        """
        names = [c.name for c in self.configurations]
        if name not in names:
            raise ValueError(f"No configuration called {name!r}; there are {names}.")
        return names.index(name)

    def good_fraction(self, threshold: float = 0.9) -> np.ndarray:
        """Fraction of the grid where each configuration's map has NCC ≥ ``threshold``.

        Parameters
        ----------
        threshold : float
            NCC above which a grid point counts as "good".

        Returns
        -------
        numpy.ndarray
            ``(C, 3)``: per configuration and map.

        Examples
        --------
        >>> result = similarity_benchmark([0.1], [1.0], configurations=DEFAULT_CONFIGURATIONS[:1], shape=(16, 16))
        >>> result.good_fraction(0.5)
        array([[1., 1., 1.]])
        """
        return (self.similarity >= threshold).mean(axis=(1, 2))

    def table(self, threshold: float = 0.9, points: bool = False) -> str:
        """The results as text.

        Parameters
        ----------
        threshold : float
            NCC above which a grid point counts as "good".
        points : bool
            Also list the NCC of every map at every grid point.

        Returns
        -------
        str
            Per configuration and map: mean NCC over the grid, the fraction of the
            grid with NCC ≥ ``threshold`` and the NCC at the noisiest point; the
            noisy input's values first, as a baseline.

        Examples
        --------
        >>> result = similarity_benchmark([0.1], [1.0], configurations=DEFAULT_CONFIGURATIONS[:1], shape=(16, 16))
        >>> print(result.table().splitlines()[0])  # doctest: +NORMALIZE_WHITESPACE
        noise model 1, σ = (0, ασ0, ασ0); σ0 in [0.1, 0.1] (1 values), α in [1, 1] (1 values), 16x16 px, periods (8, 8) px
        """
        sigma = "(0, ασ0, ασ0)" if self.noise_model == 1 else "(σ0, ασ0, ασ0)"
        lines = [
            f"noise model {self.noise_model}, σ = {sigma}; σ0 in [{self.sigma0s[0]:g}, {self.sigma0s[-1]:g}] "
            f"({len(self.sigma0s)} values), α in [{self.alphas[0]:g}, {self.alphas[-1]:g}] ({len(self.alphas)} values), "
            f"{self.shape[0]}x{self.shape[1]} px, periods ({self.period[0]:g}, {self.period[1]:g}) px",
            "",
            f"{'configuration':<30} {'map':<6} {'mean NCC':>9} {f'NCC≥{threshold:g}':>9} {'noisiest':>9} {'fits ok':>8}",
        ]
        rows = [("noisy input (no GP)", self.noisy_similarity, None)]
        rows += [(c.name, self.similarity[i], self.converged[i]) for i, c in enumerate(self.configurations)]
        for name, sim, ok in rows:
            fits = "" if ok is None else f"{int(ok.sum())}/{ok.size}"
            for m, map_name in enumerate(MAP_NAMES):
                values = sim[..., m]
                lines.append(
                    f"{name if m == 0 else '':<30} {map_name:<6} {values.mean():>9.3f} "
                    f"{(values >= threshold).mean():>9.2f} {values[-1, -1]:>9.3f} {fits if m == 0 else '':>8}"
                )
        if points:
            lines += ["", f"{'configuration':<30} {'σ0':>5} {'α':>5} " + " ".join(f"{n:>6}" for n in MAP_NAMES)]
            for i, c in enumerate(self.configurations):
                for s, sigma0 in enumerate(self.sigma0s):
                    for a, alpha in enumerate(self.alphas):
                        values = " ".join(f"{v:>6.3f}" for v in self.similarity[i, s, a])
                        lines.append(f"{c.name:<30} {sigma0:>5.2f} {alpha:>5.2f} {values}")
        return "\n".join(lines)

    def plot(self, configurations: Sequence[str] | None = None):
        """Similarity maps: one row per configuration, maps 1-3 and their RGB composite.

        Each panel shows NCC over the grid, ``α`` along x and ``σ0`` along y.  In the
        RGB panel red, green and blue are the NCC of maps 1, 2 and 3, each channel on
        its own fixed [0, 1] scale (so white means all three maps are recovered,
        cyan that map 1 is lost, and colours compare across rows).

        Parameters
        ----------
        configurations : sequence of str, optional
            Names of the configurations to show; default all.

        Returns
        -------
        matplotlib.figure.Figure

        Examples
        --------
        >>> import matplotlib.pyplot as plt
        >>> result = similarity_benchmark([0.0, 0.2], [1.0, 2.0], configurations=DEFAULT_CONFIGURATIONS[:2], shape=(16, 16))
        >>> fig = result.plot()
        >>> sum(1 for ax in fig.axes if ax.images)  # 2 rows x (3 maps + RGB)
        8
        >>> plt.close(fig)
        """
        import matplotlib.pyplot as plt

        rows = range(len(self.configurations)) if configurations is None else [self.index(n) for n in configurations]
        fig, axes = plt.subplots(len(rows), 4, figsize=(13, 2.6 * len(rows) + 0.8), squeeze=False,
                                 constrained_layout=True)
        extent = _extent(self.alphas, self.sigma0s)
        for row, i in zip(axes, rows):
            for m, ax in enumerate(row[:3]):
                image = ax.imshow(self.similarity[i, ..., m], origin="lower", extent=extent, aspect="auto",
                                  vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
                ax.set_title(f"{self.configurations[i].name}: {MAP_NAMES[m]}", fontsize="small")
            row[3].imshow(np.clip(self.similarity[i], 0.0, 1.0), origin="lower", extent=extent, aspect="auto",
                          interpolation="nearest")
            row[3].set_title("RGB = NCC of maps 1, 2, 3", fontsize="small")
        for ax in axes[-1]:
            ax.set_xlabel("α")
        for ax in axes[:, 0]:
            ax.set_ylabel("σ0")
        fig.colorbar(image, ax=axes, shrink=min(0.9, 0.5 + 0.1 * len(rows)), aspect=30, label="NCC with the truth")
        sigma = "(0, ασ0, ασ0)" if self.noise_model == 1 else "(σ0, ασ0, ασ0)"
        fig.suptitle(f"Similarity of GP reconstructions to the truth, noise model {self.noise_model}: σ = {sigma}")
        return fig


def similarity_benchmark(
    sigma0s: Sequence[float] | None = None,
    alphas: Sequence[float] | None = None,
    noise_model: int = 1,
    configurations: Sequence[Configuration] | None = None,
    shape: tuple[int, int] = (48, 48),
    period: tuple[float, float] = (8.0, 8.0),
    seed: int | None = 0,
    rank: int = 1,
    max_iter: int = 1000,
    tol: float = 1e-9,
    show_progressbar: bool = False,
) -> SimilarityBenchmark:
    """Reconstruct noisy copies of the three similarity maps over a ``(σ0, α)`` grid.

    Parameters
    ----------
    sigma0s : sequence of float, optional
        Values of ``σ0`` (≥ 0); default 6 values from 0 to 1.
    alphas : sequence of float, optional
        Values of ``α`` (≥ 0); default 5 values from 0 to 8.
    noise_model : {1, 2}
        See :func:`noise_levels`.
    configurations : sequence of Configuration, optional
        Default :data:`DEFAULT_CONFIGURATIONS` (free, [2, 5] px, [10, 11] px bounds;
        independent and parallel).
    shape : (int, int)
        Map size in pixels.
    period : (float, float)
        Sine periods (y, x) of maps 1 and 3, in pixels.
    seed : int or None
        Seed of the noise draw shared by all grid points.
    rank : int
        Rank of the parallel model's task covariance.
    max_iter, tol : int, float
        Optimiser settings of each fit.
    show_progressbar : bool
        One tick per fit.

    Returns
    -------
    SimilarityBenchmark
        Arrays of NCC per configuration, grid point and map, with ``.table()`` and
        ``.plot()``.

    Raises
    ------
    ValueError
        For negative or non-finite noise parameters, an unknown noise model, invalid
        configurations or a map too small for the periods.

    Examples
    --------
    >>> result = similarity_benchmark([0.0, 0.3], [2.0], configurations=DEFAULT_CONFIGURATIONS[:2], shape=(16, 16))
    >>> result.similarity.shape  # configurations × σ0 × α × maps
    (2, 2, 1, 3)
    >>> bool(result.similarity[:, 0].min() > 0.99)  # no noise: the truth comes back
    True
    """
    sigma0s = _grid_values(sigma0s, np.linspace(0.0, 1.0, 6), "sigma0s")
    alphas = _grid_values(alphas, np.linspace(0.0, 8.0, 5), "alphas")
    noise_levels(0.0, 0.0, noise_model)  # validates noise_model
    configurations = _check_configurations(configurations)
    shape, period = _check_geometry(shape, period)
    truth = similarity_maps(shape, period)
    standard_normal = np.random.default_rng(seed).standard_normal(truth.shape)
    n_conf, n_s, n_a = len(configurations), len(sigma0s), len(alphas)
    similarity = np.empty((n_conf, n_s, n_a, 3))
    noisy_similarity = np.empty((n_s, n_a, 3))
    lengthscales = np.empty((n_conf, n_s, n_a, 3, 2))
    converged = np.empty((n_conf, n_s, n_a), dtype=bool)
    from tqdm.auto import tqdm

    with tqdm(total=n_conf * n_s * n_a, desc="Similarity benchmark", unit="fit",
              disable=not show_progressbar) as progress:
        for s, sigma0 in enumerate(sigma0s):
            for a, alpha in enumerate(alphas):
                noisy = truth + noise_levels(sigma0, alpha, noise_model)[:, None, None] * standard_normal
                noisy_similarity[s, a] = _ncc_per_map(truth, noisy)
                for c, config in enumerate(configurations):
                    mean, ls, ok = _reconstruct(noisy, config, rank, max_iter, tol)
                    similarity[c, s, a] = _ncc_per_map(truth, mean)
                    lengthscales[c, s, a], converged[c, s, a] = ls, ok
                    progress.update(1)
    return SimilarityBenchmark(sigma0s, alphas, int(noise_model), configurations, similarity, noisy_similarity,
                               lengthscales, converged, shape, period, seed)


def _reconstruct(noisy: np.ndarray, config: Configuration, rank: int, max_iter: int, tol: float):
    """GP mean of ``(3, ny, nx)`` maps on their own grid, fitted length scales, whether all went well."""
    from hyperspy_gp.maps_gp import fit_and_predict_maps
    from hyperspy_gp.request import Request

    request = Request(components=[0, 1, 2], mode=config.mode, upsampling=1,
                       lengthscale_bounds=config.lengthscale_bounds, kernel="separable", rank=rank,
                       solver="kronecker", device="cpu", dtype="float64", chunks=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_and_predict_maps(np.moveaxis(noisy, 0, -1), request, isotropic=False, max_iter=max_iter, tol=tol,
                               show_progressbar=False)
    for w in caught:
        _logger.info("%s (%s): %s", config.name, w.category.__name__, w.message)
    ok = bool(fit.hyperparameters["converged"]) and not caught
    return np.moveaxis(fit.mean, -1, 0), fit.hyperparameters["lengthscale_px"], ok


def _ncc_per_map(truth: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """NCC of each map with its truth; a constant map (all structure lost) scores 0."""
    values = np.array([normalized_cross_correlation(t, m) for t, m in zip(truth, maps)])
    return np.nan_to_num(values, nan=0.0)


def _grid_values(values, default: np.ndarray, name: str) -> np.ndarray:
    if values is None:
        return default
    try:
        out = np.asarray(values, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, not {values!r}.") from None
    if out.size == 0 or not np.all(np.isfinite(out)) or np.any(out < 0):
        raise ValueError(f"{name} must be a non-empty sequence of finite numbers >= 0, not {values!r}.")
    return out


def _check_configurations(configurations) -> list[Configuration]:
    from hyperspy_gp.request import MODES, parse_bounds

    configurations = list(DEFAULT_CONFIGURATIONS if configurations is None else configurations)
    if not configurations:
        raise ValueError("configurations is empty: give at least one Configuration.")
    for config in configurations:
        if not isinstance(config, Configuration):
            raise TypeError(f"configurations must hold Configuration objects, not {type(config).__name__}.")
        if config.mode not in MODES:
            raise ValueError(f"Configuration {config.name!r}: mode must be one of {MODES}, not {config.mode!r}.")
        if isinstance(config.lengthscale_bounds, str):
            raise ValueError(f"Configuration {config.name!r}: lengthscale_bounds must be (lo, hi) or None.")
        parse_bounds(config.lengthscale_bounds)
    names = [c.name for c in configurations]
    if len(set(names)) != len(names):
        raise ValueError(f"Configuration names must be unique: {names}.")
    return configurations


def _check_geometry(shape, period) -> tuple[tuple[int, int], tuple[float, float]]:
    try:
        ny, nx = (int(n) for n in shape)
        py, px = (float(p) for p in period)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (ny, nx) and period (py, px), not {shape!r} and {period!r}.") from None
    if not (py > 0 and px > 0):
        raise ValueError(f"period must be positive, not {period!r}.")
    if ny < py or nx < 2 * px:
        raise ValueError(
            f"shape {shape} is too small for periods {period}: it must hold one period along y "
            f"and one doubled period along x (map 2), i.e. at least ({py:g}, {2 * px:g}) px."
        )
    return (ny, nx), (py, px)


def _extent(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """imshow extent putting pixel centres on the grid values (one step padding)."""

    def edges(v):
        step = (v[-1] - v[0]) / (len(v) - 1) if len(v) > 1 else 1.0
        return v[0] - step / 2, v[-1] + step / 2

    return (*edges(x), *edges(y))
