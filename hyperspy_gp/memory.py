"""Estimate the memory a reconstruction needs and refuse requests over a budget.

:func:`~hyperspy_gp.gp_reconstruct` calls :func:`estimate_memory` after validating
the request and before fitting, and :func:`check_memory_budget` raises
:class:`MemoryBudgetError` when the estimate exceeds the budget, so a request that
would need 200 GB fails in milliseconds with the numbers and the fix instead of
swapping or being killed after minutes of training.

The estimate counts the arrays that dominate, with ``m`` output pixels (``n`` scan
pixels × ``upsampling`` per axis), ``T`` maps, ``P`` models (1 in parallel mode,
``T`` in independent mode) and ``S`` spectral channels:

- **output**: the GP maps and their variance (four ``m × T`` float64 arrays: the
  result and the signals built from it) and, for an eager result, the spectrum
  image ``m × S``;
- **fitting**: Kronecker path, the per-axis eigenvectors and the ``T × T`` blocks
  ``λ_j B + D`` of every eigenvalue with their factors and inverses; non-separable
  kernel, the dense ``n × n`` factor; dense path (missing pixels), the
  ``(|O|T)²`` covariance, its Cholesky factor and autograd's copies; iterative
  path, the conjugate-gradient vectors of the targets and the probes and the FFT
  buffers;
- **prediction**: the temporaries of the chunks that dask runs at once, plus the
  predicted maps and their copies in the maps' units; iterative path, where its
  variance is drawn, the whole upsampled mean, variance and its error and one batch of
  prior draws (with windows, chunks of rows and the windows' factors).

It is an estimate of the peak, accurate to a small factor, not an accounting of
every allocation.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

#: Budget used when ``memory_budget=None``: bytes, or ``None`` for
#: :data:`AVAILABLE_FRACTION` of the available RAM (needs psutil) and otherwise
#: :data:`FALLBACK_BUDGET`.  Set it once per session to change the default, e.g.
#: ``hyperspy_gp.memory.DEFAULT_MEMORY_BUDGET = "32 GB"``.
DEFAULT_MEMORY_BUDGET: int | str | None = None
#: Fraction of the currently available RAM used as the default budget.
AVAILABLE_FRACTION = 0.8
#: Default budget when psutil is not installed.
FALLBACK_BUDGET = 8 * 2**30
#: Temporaries of one prediction chunk when ``chunks=None`` (as the engine chooses).
CHUNK_BYTES = 64 * 2**20
#: Complex spectra transformed at once by the FFT products of the iterative path.
FFT_GROUP_BYTES = 2**25
#: Probes of the stochastic log-determinant estimates (iterative path, Schur complement by CG).
LOGDET_PROBES = 16
#: Draws of the Monte-Carlo variances (iterative path, Schur complement by CG) unless
#: ``gp_reconstruct(variance_samples=...)`` says otherwise.
VARIANCE_DRAWS = 64
#: Pixels of a tile, one block (per whitened map) of the Schur complement by CG's
#: block-Jacobi preconditioner: 5 × 5 pixels.
JACOBI_TILE_PIXELS = 25
#: Largest tile (pixels) of that preconditioner where the mask has connected masked
#: regions (coarse points): 10 × 10 pixels.
REGION_TILE_PIXELS = 100
#: Largest ``P T' c²`` (models × whitened maps × coarse points²) of the coarse-space
#: correction of the Schur complement by CG: each of its matrices (``T'`` blocks of
#: ``c × c`` per model, one per whitened map that gets it) stays under 32 MB.
COARSE_MATRIX_VALUES = 2**22
#: Largest ``P m c`` (models × missing pixels × coarse points): its basis under 256 MB.
#: Measured, one likelihood evaluation, 256² × 12 maps, a masked quarter disc (18 689
#: pixels) with one whitened map that needs the coarse space, length scales 1.4 times
#: those fitted to the complete maps: 2**23 (377 coarse points) 294 s, 228 CG
#: iterations, peak RSS 2.3 GB; 2**24 (760) 261 s, 159, 2.2 GB; 2**25 (1121) 226 s,
#: 148, 2.8 GB, and 213 s, 2.35 GB once the basis was rotated into the eigenbasis a
#: block of columns at a time.
COARSE_BASIS_VALUES = 2**25
#: Values of one chunk of the missing pixels' temporaries (pixels × lines × ``n_b``) on the
#: iterative path (:class:`~hyperspy_gp.gp.pixel_rows.PixelRows`): 32 MB.
PIXEL_ROWS_CHUNK_VALUES = 2**22
#: Largest ``|M| · n · T`` (missing pixels × grid pixels × maps) for the factorised Schur
#: complement (:mod:`~hyperspy_gp.gp.schur`): its columns ``H_k``, one field per missing
#: pixel and whitened map, take this many float64 values (32 million: 256 MB).
MAX_SCHUR_ENTRIES = 32 * 2**20
#: Missing pixels per block of columns of the streamed exact variance increase after a
#: fit by CG (:func:`~hyperspy_gp.gp.schur.streamed_increase`).
STREAM_BLOCK = 256
#: Largest ``|M|²`` of that streamed increase: ``C_k`` and its factor (then the factor
#: and a copy of its leading block in the triangular solves), 1 GB each.  Measured at
#: 128² × 6 with half the pixels missing at random (8227), 2× upsampled: 190 s and
#: 2.2 GB peak RSS against 12 s and 0.9 GB for the Monte-Carlo posterior.
MAX_STREAMED_MISSING_SQUARED = 2**27
#: Largest cost (multiply-adds, :func:`streamed_increase_cost`) of that streamed increase:
#: a few minutes on 2 CPU cores (measured: 1.1e12 for a 128² × 6 quarter disc, 4705
#: missing pixels, 2× upsampled, 93 s).
MAX_STREAMED_INCREASE_COST = 4e12
#: Largest ``m_W²`` of any window of the windowed increase
#: (:mod:`~hyperspy_gp.gp.schur_windows`, the fewer of its missing or observed pixels):
#: 128 MB per copy of a window's factorised matrix (:func:`estimate_memory` counts two).
MAX_WINDOW_MISSING_SQUARED = 2**24
#: Largest window (pixels) of the windowed increase: a block of its fields and of its
#: core's test points stays within 3 · ``STREAM_BLOCK`` · 2¹⁴ · (1 + upsampling^d) values.
MAX_WINDOW_PIXELS = 2**14
#: Largest number of measured pixels, squared, of a window of the iterative path's
#: exact variance (:mod:`~hyperspy_gp.gp.window_variance`): 256 MB per copy of its Gram
#: matrix (three are held), 5792 pixels, the edge strips of length scales up to about 6 px.
MAX_VARIANCE_WINDOW_SQUARED = 2**25
#: Test points (and Gram rows) per block of the iterative path's windows
#: (:mod:`~hyperspy_gp.gp.window_variance`).
WINDOW_BLOCK = 1024
#: The same limits on a GPU (``device="cuda"``): ``|M|²`` up to ``2**30`` (8 GB per copy;
#: the GPU memory check, :func:`check_device_memory`, bounds it further), and a cost
#: limit as many times the CPU's as the iterative path's missing-pixel limit
#: (:data:`~hyperspy_gp.gp.iterative_missing.MAX_MISSING_COST_GPU`, measured on an H200).
#: Not measured for this computation itself; the 256² × 12 quarter disc (18 689 missing
#: pixels, 2× upsampled) costs 9.7e13.
MAX_STREAMED_MISSING_SQUARED_GPU = 2**30
MAX_STREAMED_INCREASE_COST_GPU = 5e14
_FLOAT64 = 8


class MemoryBudgetError(MemoryError, ValueError):
    """A reconstruction would need more memory than ``memory_budget`` allows.

    A ``MemoryError`` and a ``ValueError`` (a request the caller can change), raised
    before any fitting.

    Examples
    --------
    >>> issubclass(MemoryBudgetError, MemoryError), issubclass(MemoryBudgetError, ValueError)
    (True, True)
    """


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of a reconstruction, in bytes, by stage.

    Attributes
    ----------
    maps
        GP maps and variances kept in the result.
    spectrum_image
        The eager reconstructed spectrum image (0 for a lazy result).
    fitting
        Peak working memory of the likelihood and its gradient.
    prediction
        Peak working memory of the prediction (chunk temporaries and results).

    Examples
    --------
    >>> est = MemoryEstimate(maps=100, spectrum_image=1000, fitting=50, prediction=200)
    >>> est.output, est.total
    (1100, 1300)
    """

    maps: int
    spectrum_image: int
    fitting: int
    prediction: int

    @property
    def output(self) -> int:
        """Bytes held by the returned signals.

        Examples
        --------
        >>> MemoryEstimate(maps=100, spectrum_image=1000, fitting=50, prediction=200).output
        1100
        """
        return self.maps + self.spectrum_image

    @property
    def total(self) -> int:
        """Peak estimate: the outputs plus the larger working stage.

        Examples
        --------
        >>> MemoryEstimate(maps=100, spectrum_image=1000, fitting=50, prediction=200).total
        1300
        """
        return self.output + max(self.fitting, self.prediction)

    def describe(self) -> str:
        """One line with the total and its parts, in human units.

        Returns
        -------
        str

        Examples
        --------
        >>> MemoryEstimate(2**20, 2**30, 2**20, 2**21).describe().startswith("about ")
        True
        """
        return (
            f"about {_fmt(self.total)} (spectrum image {_fmt(self.spectrum_image)}, GP maps and "
            f"variances {_fmt(self.maps)}, fitting {_fmt(self.fitting)}, prediction {_fmt(self.prediction)})"
        )


def estimate_memory(
    grid_shape: tuple[int, ...],
    n_maps: int,
    n_channels: int,
    *,
    mode: str = "parallel",
    upsampling: int = 1,
    kernel: str = "separable",
    n_observed: int | None = None,
    n_missing: int = 0,
    dtype: str = "float64",
    lazy_output: bool = False,
    chunks: int | None = None,
    iterative: bool = False,
    schur_cg: bool = False,
    n_coarse: int | Sequence[int] = 0,
    n_jacobi_values: int | None = None,
    exact_posterior: bool = True,
    device: str = "cpu",
    variance_samples: int = VARIANCE_DRAWS,
) -> MemoryEstimate:
    """Estimate the peak memory of :func:`~hyperspy_gp.gp_reconstruct`.

    Parameters
    ----------
    grid_shape
        Scan grid, numpy order.
    n_maps, n_channels
        Maps reconstructed (``T``) and spectral channels (``S``).
    mode, upsampling, kernel, dtype, lazy_output, chunks, variance_samples
        As in :func:`~hyperspy_gp.gp_reconstruct`.
    n_observed
        Measured pixels when some are missing (dense solver), ``None`` for a
        complete grid (Kronecker solver).
    n_missing
        Missing pixels on the Kronecker path (Schur complement) or the iterative path, 0
        for a complete grid.
    iterative
        Whether the iterative path (``solver="iterative"``) serves the grid, with its
        ``n_missing`` pixels by conjugate gradients on the observed values.
    schur_cg
        Whether the Schur complement over the ``n_missing`` pixels is solved by
        conjugate gradients (many scattered missing pixels) rather than factorised.
    n_coarse
        Coarse points of its coarse-space correction
        (:func:`~hyperspy_gp.gp.coarse_space.coarse_points`), 0 for none: one count per
        number ``1 … T`` of whitened maps that get it (the lattice is sized for them,
        :class:`~hyperspy_gp.gp.coarse_space.CoarseLattice`), the worst counted; or one
        count for all ``T``.
    n_jacobi_values
        Values of its block-Jacobi preconditioner's tile blocks per model, as the mask
        gives them (:func:`~hyperspy_gp.gp.schur_iterative.jacobi_block_values`);
        ``None``: the bound for tiles of
        :data:`~hyperspy_gp.memory.JACOBI_TILE_PIXELS` pixels.
    exact_posterior
        With ``schur_cg``: whether the prediction takes the exact factorised posterior
        where its columns fit (:func:`schur_columns_fit`), or streams the exact variance
        where that is affordable (:func:`streamed_increase_fits`), or computes it window
        by window (:mod:`~hyperspy_gp.gp.schur_windows`, chosen after the fit: the
        windows grow with the length scales), rather than the Monte-Carlo one.
    device
        The torch device of the GP: the streamed variance's limits depend on it.

    Returns
    -------
    MemoryEstimate

    Examples
    --------
    >>> from hyperspy_gp.memory import estimate_memory
    >>> est = estimate_memory((256, 256), 6, 2048, upsampling=4)
    >>> round(est.spectrum_image / 2**30)  # 1024 × 1024 × 2048 float64
    16
    >>> estimate_memory((256, 256), 6, 2048, upsampling=4, lazy_output=True).spectrum_image
    0
    """
    n_pixels = math.prod(grid_shape)
    n_out = n_pixels * upsampling ** len(grid_shape)
    map_bytes = n_out * n_maps * _FLOAT64
    spectrum = 0 if lazy_output else n_out * n_channels * _FLOAT64
    itemsize = 4 if dtype == "float32" else _FLOAT64
    n_models, n_tasks = (1, n_maps) if mode == "parallel" else (n_maps, 1)
    fitting = _fitting_bytes(grid_shape, n_models, n_tasks, kernel, n_observed, itemsize)
    prediction = _prediction_bytes(grid_shape, upsampling, n_models, n_tasks, kernel, n_observed, chunks)
    if n_observed is None and n_missing and schur_cg:
        # CG vectors over the missing values; probe vectors on the grid, Σ of one of them
        # and its autograd copy; the preconditioner's tile blocks (k² values for the
        # k pixels of each tile that holds a missing pixel, per whitened map) with
        # their factors, and the chunk they are built in.  Prediction: the factorised
        # posterior's columns where they fit, else the streamed exact increase where it
        # is affordable, else the draws' weights, their white noise and the draws'
        # predictions (one chunk per thread).
        columns = n_models * (1 + LOGDET_PROBES) * n_tasks
        tiles = n_models * (n_tasks * min(n_missing * JACOBI_TILE_PIXELS**2, n_pixels * JACOBI_TILE_PIXELS)
                            if n_jacobi_values is None else n_jacobi_values)
        fitting += (6 * columns * n_missing + 4 * columns * n_pixels + 2 * tiles) * itemsize + CHUNK_BYTES
        # The coarse space: kernel columns and their orthonormal basis (m × c), the basis
        # rotated into the eigenbasis (n × c), and six matrices (E, F, their factors, the
        # two weights) of T' blocks c × c each, one per whitened map that gets it.
        counts = {n_tasks: n_coarse} if isinstance(n_coarse, int) else dict(enumerate(n_coarse, start=1))
        fitting += n_models * max((2 * n_missing + n_pixels) * c + 6 * maps * c**2
                                  for maps, c in counts.items()) * itemsize
        factor_shape = tuple(grid_shape) if kernel == "separable" else (n_pixels,)
        if exact_posterior and schur_columns_fit(n_pixels, n_missing, n_tasks, n_models):  # the factorised posterior
            # Its columns, and as much again for C_k, their factors and the chunks' products.
            prediction += 2 * n_models * schur_entries(n_pixels, n_missing, n_tasks) * _FLOAT64
        elif exact_posterior and streamed_increase_fits(factor_shape, n_missing, n_tasks, n_models, n_out, device):
            # The streamed exact increase: C_k and its factor (or the factor and a copy of
            # its leading block), a block of fields on the grid and on the test grid (three
            # of each), and the increase on the test grid.
            per_model = 2 * n_missing**2 + 3 * STREAM_BLOCK * (n_pixels + n_out) + n_tasks * n_out
            prediction += n_models * per_model * _FLOAT64
        else:
            draws = n_models * variance_samples * n_tasks * n_pixels
            drawn = 3 * draws * _FLOAT64 + (os.cpu_count() or 1) * CHUNK_BYTES
            # Or the exact increase window by window (:mod:`~hyperspy_gp.gp.schur_windows`,
            # chosen after the fit): as streamed, with one window's complement at a time.
            windowed = 0
            if exact_posterior and kernel == "separable":
                largest = min(n_missing**2, MAX_WINDOW_MISSING_SQUARED)
                fields = 3 * STREAM_BLOCK * min(n_pixels, MAX_WINDOW_PIXELS) * (1 + upsampling ** len(grid_shape))
                windowed = n_models * (2 * largest + fields + n_tasks * n_out)
            prediction += max(drawn, windowed * _FLOAT64)
    elif n_observed is None and n_missing:
        # Schur columns G_k = Σ_k⁻¹E_M (H_k = G_k L_k⁻ᵀ in place), K H_k, their mode products'
        # temporaries and autograd's copies: |M|·n·T each.
        fitting += 4 * n_models * schur_entries(n_pixels, n_missing, n_tasks) * itemsize
    if iterative:
        fitting, prediction = _iterative_bytes(grid_shape, upsampling, n_models, n_tasks, itemsize, n_missing)
    return MemoryEstimate(4 * map_bytes, spectrum, fitting, prediction + 2 * 2 * map_bytes)


def schur_entries(n_pixels: int, n_missing: int, n_tasks: int) -> int:
    """Values ``|M| · n · T`` of the factorised Schur complement's columns, per model (:data:`MAX_SCHUR_ENTRIES`)."""
    return n_missing * n_pixels * n_tasks


def schur_columns_fit(n_pixels: int, n_missing: int, n_tasks: int, n_models: int) -> bool:
    """Whether the factorised Schur complement's columns of all models fit :data:`MAX_SCHUR_ENTRIES`.

    Then the exact factorised posterior also serves a fit by CG (exact variance instead
    of a Monte-Carlo estimate), and the iterative posterior's separable twin keeps its
    Schur columns.
    """
    return n_models * schur_entries(n_pixels, n_missing, n_tasks) <= MAX_SCHUR_ENTRIES


def streamed_increase_cost(factor_shape: Sequence[int], n_missing: int, n_tasks: int, n_models: int,
                           n_test: int) -> float:
    """Multiply-adds of the streamed exact variance increase on ``n_test`` test points.

    Per model and whitened map: ``C_k``'s columns and the blocks of ``L_k^{-T}`` on the
    grid (``2 |M| n Σ_a n_a``), its factor and triangular solves (``|M|³ / 3`` each), and
    the products with the test grid (``|M| n_test Σ_a n_a``).
    """
    n, sizes = math.prod(factor_shape), sum(factor_shape)
    return float(n_models * n_tasks) * (float(n_missing) ** 3 * 2 / 3 + 2.0 * n_missing * n * sizes
                                        + float(n_missing) * n_test * sizes)


def streamed_increase_fits(factor_shape: Sequence[int], n_missing: int, n_tasks: int, n_models: int,
                           n_test: int, device: str = "cpu") -> bool:
    """Whether a fit by CG gets the streamed exact variance on ``device``.

    Its ``|M|²`` at most :data:`MAX_STREAMED_MISSING_SQUARED` and its cost
    (:func:`streamed_increase_cost`) at most :data:`MAX_STREAMED_INCREASE_COST`; on a
    GPU the ``_GPU`` limits.

    Examples
    --------
    >>> from hyperspy_gp.memory import streamed_increase_fits
    >>> quarter_disc = dict(n_missing=18689, n_tasks=12, n_models=1, n_test=512 * 512)  # 256² × 12, 2×
    >>> streamed_increase_fits((256, 256), **quarter_disc), streamed_increase_fits((256, 256), **quarter_disc,
    ...                                                                             device="cuda")
    (False, True)
    """
    on_gpu = str(device).startswith("cuda")
    max_squared = MAX_STREAMED_MISSING_SQUARED_GPU if on_gpu else MAX_STREAMED_MISSING_SQUARED
    return n_missing**2 <= max_squared and \
        streamed_increase_cost(factor_shape, n_missing, n_tasks, n_models, n_test) <= increase_cost_limit(device)


def increase_cost_limit(device: str = "cpu") -> float:
    """The most multiply-adds an exact variance increase may cost on ``device``.

    :data:`MAX_STREAMED_INCREASE_COST`, or :data:`MAX_STREAMED_INCREASE_COST_GPU` on a
    GPU; the streamed increase and the windows of
    :mod:`~hyperspy_gp.gp.schur_windows` share it.
    """
    return MAX_STREAMED_INCREASE_COST_GPU if str(device).startswith("cuda") else MAX_STREAMED_INCREASE_COST


def _fitting_bytes(grid_shape, n_models, n_tasks, kernel, n_observed, itemsize) -> int:
    n_pixels = math.prod(grid_shape)
    if n_observed is not None:
        # Σ_OO, the two einsum terms it is summed from, its factor and autograd's copies.
        return 6 * n_models * (n_observed * n_tasks) ** 2 * itemsize
    factors = [n_pixels] if kernel != "separable" else list(grid_shape)
    # Per factor: the matrix, its eigenvectors and its gradient.
    spatial = 3 * n_models * sum(n * n for n in factors)
    # Blocks λ_j B + D, their factors, inverses and gradient temporaries.
    blocks = 4 * n_models * n_pixels * n_tasks**2
    # Targets, rotated targets, weights and their pixel-basis copies.
    vectors = 6 * n_models * n_pixels * n_tasks
    return (spatial + blocks + vectors) * itemsize


def _iterative_bytes(grid_shape, upsampling, n_models, n_tasks, itemsize, n_missing=0) -> tuple[int, int]:
    n_pixels = math.prod(grid_shape)
    # Missing pixels (:mod:`~hyperspy_gp.gp.iterative_missing`), the preconditioner built
    # from the m missing pixels or, on a sparse scan, from the m measured ones: T Gram
    # matrices, factors and inverses (T m² each); the products of the r ≤ n_1 lines
    # holding those pixels (r² (n_1 + n / n_1)), the rows by pixel and by line
    # (:class:`~hyperspy_gp.gp.pixel_rows.PixelRows`) and a chunk of temporaries.
    # Prediction keeps two such preconditioners and the separable twin's Schur columns
    # (|M| · n · T values) where they fit.
    fits = schur_columns_fit(n_pixels, n_missing, n_tasks, n_models)
    twin = 2 * schur_entries(n_pixels, n_missing, n_tasks) if fits else 0
    block = min(n_missing, n_pixels - n_missing)
    lines, rest = min(block, grid_shape[0]), n_pixels // grid_shape[0]
    per_model = 3 * n_tasks * block**2 + lines**2 * (grid_shape[0] + rest) + 2 * block * rest
    per_model += 2 * PIXEL_ROWS_CHUNK_VALUES if n_missing else 0
    missing_fitting = n_models * per_model * itemsize
    missing_prediction = n_models * (2 * per_model + twin) * _FLOAT64
    columns = n_models * (1 + LOGDET_PROBES) * n_tasks
    # CG: solution, residual, preconditioned residual, direction, its product and the
    # right-hand sides; gradient: left and right vectors, K·right and their spectra.
    vectors = 12 * columns * n_pixels * itemsize
    preconditioner = 3 * n_models * n_pixels * n_tasks**2 * itemsize
    fitting = vectors + preconditioner + 3 * 2 * FFT_GROUP_BYTES  # FFT groups, spectra and products
    fine = n_pixels * upsampling ** len(grid_shape)
    # The upsampled mean, variance and its error, the twins' exact variances, the three
    # running sums of the estimate, a batch of draws (at most 4 CHUNK_BYTES, or one draw:
    # a torus of the maps and a few upsampled arrays), the posterior's CG vectors and the
    # allocator's slack: measured 576, 720, 670, 485, 1445 and 1490 MB over the baseline
    # on 128² × 6, 256² × 3, 256² × 6 maps at 2×, 128² × 6 at 4×, 384² × 6 and 512² × 3
    # at 2× (length scale 3 px, 64 draws), where this gives 508, 636, 888, 888, 1516 and
    # 1392 MB.
    prediction = 40 * n_models * n_tasks * fine * _FLOAT64 + 6 * CHUNK_BYTES
    # Or the exact variance window by window (:mod:`~hyperspy_gp.gp.window_variance`,
    # chosen after the fit): a window's Gram matrix and factor and their copy in the
    # factorisation, a block of its kernel's temporaries, and a few upsampled arrays.
    largest = min(n_pixels**2, MAX_VARIANCE_WINDOW_SQUARED)
    windowed = 3 * largest + 8 * math.isqrt(largest) * WINDOW_BLOCK + 8 * n_models * n_tasks * fine
    prediction = max(prediction, windowed * _FLOAT64 + 6 * CHUNK_BYTES)
    return fitting + missing_fitting, prediction + missing_prediction


def _prediction_bytes(grid_shape, upsampling, n_models, n_tasks, kernel, n_observed, chunks) -> int:
    n_rows = grid_shape[0] * upsampling
    row = math.prod(n * upsampling for n in grid_shape[1:])
    if n_observed is not None:
        per_row = row * n_models * n_tasks**2 * n_observed * _FLOAT64 * 2
    else:
        per_row = row * n_models * n_tasks * _FLOAT64 * 4
        if kernel != "separable":
            per_row *= max(1, math.prod(grid_shape) // n_tasks)
    rows = min(n_rows, chunks if chunks is not None else max(1, CHUNK_BYTES // per_row))
    concurrent = min(os.cpu_count() or 1, math.ceil(n_rows / rows))  # dask's threads
    return concurrent * rows * per_row


def resolve_budget(memory_budget: int | float | str | None) -> tuple[float, str]:
    """The budget in bytes and where it comes from (for messages).

    Parameters
    ----------
    memory_budget
        Bytes (int or float, ``float("inf")`` disables the check), a string such as
        ``"16 GB"``, or ``None`` for :data:`DEFAULT_MEMORY_BUDGET`.

    Examples
    --------
    >>> from hyperspy_gp.memory import resolve_budget
    >>> resolve_budget("2 GiB")
    (2147483648.0, 'memory_budget=2.00 GiB')
    """
    source = "memory_budget"
    if memory_budget is None:
        memory_budget, source = DEFAULT_MEMORY_BUDGET, "hyperspy_gp.memory.DEFAULT_MEMORY_BUDGET"
    if memory_budget is None:
        return _default_budget()
    budget = _parse(memory_budget)
    return budget, f"{source}={_fmt(budget)}"


def _parse(value) -> float:
    if isinstance(value, str):
        from dask.utils import parse_bytes

        try:
            value = parse_bytes(value)
        except ValueError:
            raise ValueError(
                f"memory_budget={value!r} is not a size; give bytes or a string like '16 GB'."
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(
            f"memory_budget must be a positive number of bytes, a string like '16 GB' or None, not {value!r}."
        )
    return float(value)


def _default_budget() -> tuple[float, str]:
    try:
        import psutil
    except ImportError:
        return float(FALLBACK_BUDGET), f"default memory_budget={_fmt(FALLBACK_BUDGET)}"
    available = psutil.virtual_memory().available
    return (
        AVAILABLE_FRACTION * available,
        f"default memory_budget={_fmt(AVAILABLE_FRACTION * available)}, "
        f"{AVAILABLE_FRACTION:.0%} of the available RAM",
    )


def check_memory_budget(estimate: MemoryEstimate, memory_budget: int | float | str | None) -> None:
    """Raise :class:`MemoryBudgetError` when ``estimate`` exceeds the budget.

    The message gives the estimate by stage, the budget and what to change.

    Parameters
    ----------
    estimate : MemoryEstimate
        From :func:`estimate_memory`.
    memory_budget : int, float, str or None
        Bytes, a string such as ``"8 GB"``, or ``None`` for the default budget
        (:data:`DEFAULT_MEMORY_BUDGET`).

    Raises
    ------
    MemoryBudgetError
        When ``estimate.total`` exceeds the budget.

    Examples
    --------
    >>> from hyperspy_gp.memory import check_memory_budget, estimate_memory
    >>> est = estimate_memory((64, 64), 4, 1024, upsampling=8)
    >>> check_memory_budget(est, "1 GB")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hyperspy_gp.memory.MemoryBudgetError: This reconstruction would need about ...
    """
    budget, source = resolve_budget(memory_budget)
    if estimate.total <= budget:
        return
    raise MemoryBudgetError(
        f"This reconstruction would need {estimate.describe()}, more than {source}. "
        f"{_advice(estimate)} To go ahead anyway, pass a larger memory_budget "
        "(memory_budget=float('inf') turns the check off)."
    )


def check_device_memory(estimate: MemoryEstimate, device: str, memory_budget: int | float | str | None = None) -> None:
    """Raise :class:`MemoryBudgetError` when the GP would not fit in the GPU's free memory.

    With ``device="cuda"`` the fit and the prediction run in GPU memory (the larger of
    ``estimate.fitting`` and ``estimate.prediction``); the outputs stay in RAM, which
    :func:`check_memory_budget` checks.  Nothing is checked on the CPU, or when
    ``memory_budget`` is ``float("inf")`` (which turns both checks off).

    Parameters
    ----------
    estimate : MemoryEstimate
        From :func:`estimate_memory`.
    device : str
        The torch device of the GP.
    memory_budget : int, float, str or None
        As for :func:`check_memory_budget`.

    Raises
    ------
    MemoryBudgetError
        When the GP's working memory exceeds the memory free on the GPU.

    Examples
    --------
    >>> from hyperspy_gp.memory import check_device_memory, estimate_memory
    >>> check_device_memory(estimate_memory((64, 64), 4, 1024), "cpu")  # nothing to check on the CPU
    """
    if not str(device).startswith("cuda") or resolve_budget(memory_budget)[0] == math.inf:
        return
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    need = max(estimate.fitting, estimate.prediction)
    if need <= free:
        return
    chunks = " smaller chunks= (rows predicted per task)," if estimate.prediction >= estimate.fitting else ""
    raise MemoryBudgetError(
        f"The GP would need about {_fmt(need)} of GPU memory (fitting {_fmt(estimate.fitting)}, prediction "
        f"{_fmt(estimate.prediction)}), more than the {_fmt(free)} free on {torch.cuda.get_device_name(device)}. "
        f"Try dtype='float32' (half the memory), fewer components or mode='independent' (parallel mode needs "
        f"memory growing with the square of the number of maps),{chunks} cropping the scan with s.inav[...], "
        "or device='cpu'. To go ahead anyway, pass memory_budget=float('inf') (this turns both memory checks off)."
    )


@contextlib.contextmanager
def explain_gpu_out_of_memory():
    """Turn torch's CUDA out-of-memory error in the block into a :class:`MemoryBudgetError`.

    The estimate behind :func:`check_device_memory` is approximate, and other programs
    may take GPU memory meanwhile; the error then says what to change instead of
    ending in a traceback from inside torch.

    Examples
    --------
    >>> from hyperspy_gp.memory import explain_gpu_out_of_memory
    >>> with explain_gpu_out_of_memory():
    ...     pass
    """
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        first_line = (str(exc).splitlines() or ["CUDA out of memory"])[0]
        raise MemoryBudgetError(
            f"The GPU ran out of memory while fitting the GP ({first_line}). Try dtype='float32' (half the "
            "memory), fewer components or mode='independent', cropping the scan with s.inav[...], or device='cpu'."
        ) from exc


#: dask configuration key of the per-chunk release (:func:`release_freed_memory`), on by
#: default.  ``dask.config.set({RELEASE_FREED_MEMORY: False})`` (as a context manager or
#: for the session) turns it off: prediction is then faster and holds more memory (the
#: separable path, 512² × 12 maps at 4× on 2 CPU cores, five runs each: 3.5–4.2 s and
#: 1.13–1.21 GB above the baseline, against 4.2–5.2 s and 0.98–1.02 GB with it, for 0.77 GB
#: of outputs).
RELEASE_FREED_MEMORY = "hyperspy_gp.release-freed-memory"


def releases_freed_memory() -> bool:
    """Whether each prediction chunk calls :func:`release_freed_memory` (dask config :data:`RELEASE_FREED_MEMORY`).

    Examples
    --------
    >>> import dask
    >>> from hyperspy_gp.memory import RELEASE_FREED_MEMORY, releases_freed_memory
    >>> releases_freed_memory()
    True
    >>> with dask.config.set({RELEASE_FREED_MEMORY: False}):
    ...     releases_freed_memory()
    False
    """
    import dask

    return bool(dask.config.get(RELEASE_FREED_MEMORY, default=True))


def release_freed_memory() -> bool:
    """Hand the memory that freed arrays leave in the C heap back to the operating system.

    glibc's ``malloc`` keeps freed blocks below its dynamic mmap threshold (which grows
    to 32 MB) in the heap, one heap per thread.  Chunk after chunk of a prediction, on
    dask's worker threads, the process's resident memory then grows to what every
    thread's heap once held, although the arrays in use stay bounded by the chunks in
    flight.  glibc's ``malloc_trim(0)`` returns those free pages (the way
    ``dask.distributed``'s documentation has its workers' unmanaged memory trimmed).
    Called after each prediction chunk unless :data:`RELEASE_FREED_MEMORY` is off.

    Returns
    -------
    bool
        Whether memory was released: ``False`` where the C library is not glibc (macOS,
        Windows, musl), which keeps or returns freed memory on its own.

    Examples
    --------
    >>> from hyperspy_gp.memory import release_freed_memory
    >>> released = release_freed_memory()
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None``."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # (Windows: no process handle by None)
        return None


def _advice(estimate: MemoryEstimate) -> str:
    tips = []
    if estimate.spectrum_image:
        tips.append("lazy_output=True (the spectrum image is then computed chunk by chunk)")
    tips.append("a smaller upsampling")
    if estimate.prediction >= estimate.fitting:
        tips.append("smaller chunks= (rows predicted per task)")
    tips.append("cropping the scan with s.inav[...] or fewer components")
    return "Try " + ", ".join(tips) + "."


def _fmt(n_bytes: float) -> str:
    from dask.utils import format_bytes

    return format_bytes(int(n_bytes)) if math.isfinite(n_bytes) else "unlimited"
