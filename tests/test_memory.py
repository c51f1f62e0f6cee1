"""The memory estimate and the budget check run before any fitting."""

import os
import subprocess
import sys

import pytest

from hyperspy_gp import memory
from hyperspy_gp.memory import (
    JACOBI_TILE_PIXELS,
    MemoryBudgetError,
    check_memory_budget,
    estimate_memory,
    resolve_budget,
)


def test_output_terms_are_the_array_sizes():
    est = estimate_memory((30, 20), 4, 100, upsampling=3)
    n_out = 90 * 60
    assert est.spectrum_image == n_out * 100 * 8
    assert est.maps == 4 * n_out * 4 * 8  # mean and variance, each in two signals
    assert est.output == est.maps + est.spectrum_image
    assert est.total == est.output + max(est.fitting, est.prediction)


def test_lazy_output_drops_the_spectrum_image_only():
    eager = estimate_memory((64, 64), 3, 500, upsampling=2)
    lazy = estimate_memory((64, 64), 3, 500, upsampling=2, lazy_output=True)
    assert lazy.spectrum_image == 0
    assert (lazy.maps, lazy.fitting, lazy.prediction) == (eager.maps, eager.fitting, eager.prediction)


def test_dense_solver_grows_with_the_square_of_the_observed_values():
    small = estimate_memory((40, 40), 2, 10, n_observed=500)
    large = estimate_memory((40, 40), 2, 10, n_observed=1000)
    assert large.fitting == 4 * small.fitting
    # Cholesky of (|O| T)² float64, a few copies: at least one such matrix.
    assert small.fitting >= (500 * 2) ** 2 * 8


def test_kronecker_fitting_is_linear_in_the_pixels_for_many_maps():
    a = estimate_memory((100, 100), 8, 10)
    b = estimate_memory((200, 100), 8, 10)
    assert 1.9 < b.fitting / a.fitting < 2.2


def test_iterative_path_is_linear_in_the_pixels_not_quadratic_like_the_dense_kernel():
    dense = estimate_memory((64, 64), 3, 10, kernel="matern")
    iterative = estimate_memory((64, 64), 3, 10, kernel="matern", iterative=True)
    assert iterative.fitting < dense.fitting  # no 4096² factor
    a = estimate_memory((256, 256), 6, 10, kernel="matern", iterative=True)
    b = estimate_memory((512, 256), 6, 10, kernel="matern", iterative=True)
    buffers = 6 * memory.FFT_GROUP_BYTES  # fixed FFT buffers
    assert 1.5 < (b.fitting - buffers) / (a.fitting - buffers) < 2.2
    assert b.prediction > a.prediction


def test_iterative_path_counts_its_missing_pixels_without_schur_columns():
    complete = estimate_memory((256, 256), 12, 10, kernel="matern", iterative=True)
    few = estimate_memory((256, 256), 12, 10, kernel="matern", iterative=True, n_missing=76)
    many = estimate_memory((256, 256), 12, 10, kernel="matern", iterative=True, n_missing=2000)
    # Megabytes for 76 pixels, not the 5.6 GB that Schur columns (|M|T · nT values) would
    # take; for 2000 the T Gram matrices, their factors and inverses (3 T |M|² values)
    # dominate.
    assert 0 < few.fitting - complete.fitting < 2**28
    assert 0 < few.prediction - complete.prediction < 2**29
    gram = 3 * 12 * 2000**2 * 8
    assert gram < many.fitting - complete.fitting < gram + 2**29
    # A sparse scan: its preconditioner is built from the 2000 measured pixels.
    sparse = estimate_memory((256, 256), 12, 10, kernel="matern", iterative=True, n_missing=65536 - 2000)
    assert gram < sparse.fitting - complete.fitting < gram + 2**29


def test_the_estimate_of_every_path_runs_without_importing_torch():
    code = ("import sys; from hyperspy_gp.memory import estimate_memory; "
            "estimate_memory((300, 300), 6, 10, kernel='matern', iterative=True); "
            "estimate_memory((300, 300), 6, 10, n_missing=4); "
            "estimate_memory((300, 300), 6, 10, n_missing=9000, schur_cg=True); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_float32_halves_the_fitting_memory():
    f64 = estimate_memory((50, 50), 3, 10, kernel="matern")
    f32 = estimate_memory((50, 50), 3, 10, kernel="matern", dtype="float32")
    assert f32.fitting * 2 == f64.fitting


def test_explicit_chunks_set_the_prediction_temporaries():
    few = estimate_memory((64, 64), 3, 10, upsampling=4, chunks=1)
    many = estimate_memory((64, 64), 3, 10, upsampling=4, chunks=64)
    assert many.prediction > few.prediction


@pytest.mark.parametrize(
    "value, expected",
    [(1000, 1000.0), (2.5e9, 2.5e9), ("16 GB", 16e9), ("1 GiB", 2.0**30), (float("inf"), float("inf"))],
)
def test_budget_values(value, expected):
    assert resolve_budget(value)[0] == expected


@pytest.mark.parametrize("value", [0, -5, "lots", True, [1]])
def test_bad_budget_values_name_the_parameter(value):
    with pytest.raises(ValueError, match="memory_budget"):
        resolve_budget(value)


def test_module_default_is_used_for_none(monkeypatch):
    monkeypatch.setattr(memory, "DEFAULT_MEMORY_BUDGET", "3 GB")
    budget, source = resolve_budget(None)
    assert budget == 3e9 and "DEFAULT_MEMORY_BUDGET" in source


def test_default_is_a_fraction_of_available_ram():
    psutil = pytest.importorskip("psutil")
    budget, source = resolve_budget(None)
    assert budget == pytest.approx(memory.AVAILABLE_FRACTION * psutil.virtual_memory().available, rel=0.2)
    assert "available RAM" in source


def test_default_without_psutil_is_the_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
    assert resolve_budget(None)[0] == memory.FALLBACK_BUDGET


def test_over_budget_error_gives_estimate_budget_and_fixes():
    est = estimate_memory((256, 256), 6, 2048, upsampling=8)
    with pytest.raises(MemoryBudgetError) as info:
        check_memory_budget(est, "8 GB")
    message = str(info.value)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, ValueError)
    assert "spectrum image 64.00 GiB" in message  # 2048² pixels × 2048 channels, float64
    assert f"about {memory._fmt(est.total)}" in message
    assert "memory_budget=7.45 GiB" in message
    assert "lazy_output=True" in message and "upsampling" in message and "s.inav" in message
    check_memory_budget(est, float("inf"))  # turned off


def test_lazy_request_is_not_told_to_go_lazy():
    est = estimate_memory((256, 256), 6, 2048, upsampling=8, lazy_output=True)
    with pytest.raises(MemoryBudgetError) as info:
        check_memory_budget(est, "1 MB")
    assert "lazy_output" not in str(info.value)


def test_schur_columns_are_counted_for_missing_pixels_on_the_kronecker_path():
    complete = estimate_memory((256, 256), 6, 100)
    holes = estimate_memory((256, 256), 6, 100, n_missing=10)
    assert holes.fitting - complete.fitting == 4 * 10 * 256 * 256 * 6 * 8  # |M| n T values, four times


def test_schur_complement_by_cg_is_linear_in_the_missing_pixels_not_in_missing_times_grid():
    complete = estimate_memory((256, 256), 6, 100)
    few = estimate_memory((256, 256), 6, 100, n_missing=1000, schur_cg=True)
    many = estimate_memory((256, 256), 6, 100, n_missing=30000, schur_cg=True)
    assert complete.fitting < few.fitting < many.fitting < 2 * 2**30  # factorised: 30000 × 65536 × 6 values
    # CG vectors over the missing values, and the preconditioner's tile blocks (their
    # factors too): per whitened map, at most k² values per missing pixel and k per pixel.
    k = JACOBI_TILE_PIXELS  # pixels per tile and whitened map
    tiles = {m: 6 * min(m * k**2, 65536 * k) for m in (1000, 30000)}
    assert many.fitting - few.fitting == (6 * 17 * 6 * 29000 + 2 * (tiles[30000] - tiles[1000])) * 8
    assert few.prediction > complete.prediction  # the streamed exact variance increase


def test_the_streamed_exact_variance_is_counted_where_affordable_else_the_draws():
    m, n, n_out = 4705, 128 * 128, 256 * 256  # the benchmark's 128² quarter disc, 2× upsampled
    streamed = estimate_memory((128, 128), 6, 100, n_missing=m, schur_cg=True, upsampling=2)
    drawn = estimate_memory((128, 128), 6, 100, n_missing=m, schur_cg=True, upsampling=2, exact_posterior=False)
    assert memory.streamed_increase_fits((128, 128), m, 6, 1, n_out)
    # C_k and its factor, a block of fields on both grids (three of each), the increase
    per_model = 2 * m**2 + 3 * memory.STREAM_BLOCK * (n + n_out) + 6 * n_out
    draws = 3 * memory.VARIANCE_DRAWS * 6 * n * 8 + (os.cpu_count() or 1) * memory.CHUNK_BYTES
    assert streamed.prediction - drawn.prediction == per_model * 8 - draws
    # The 256² × 12 quarter disc is beyond the streamed increase on the CPU (the draws are
    # counted), within its limits on a GPU.
    large = dict(n_missing=18689, schur_cg=True, upsampling=2)
    drawn = estimate_memory((256, 256), 12, 100, exact_posterior=False, **large).prediction
    assert estimate_memory((256, 256), 12, 100, **large).prediction == drawn
    on_gpu = estimate_memory((256, 256), 12, 100, device="cuda", **large).prediction
    assert on_gpu > drawn + 2 * 18689**2 * 8  # C_k and its factor: 5.6 GB
    # The windows (chosen after the fit) are counted where they could take more than the
    # draws: one window's complement and its factor, a block of its fields and of its
    # core's test points, and the increase on the test grid.
    few = dict(large, variance_samples=1)
    counted = estimate_memory((256, 256), 12, 100, **few).prediction
    draws = 3 * 12 * 65536 * 8 + (os.cpu_count() or 1) * memory.CHUNK_BYTES
    windows = (2 * memory.MAX_WINDOW_MISSING_SQUARED + 3 * memory.STREAM_BLOCK * memory.MAX_WINDOW_PIXELS * 5
               + 12 * 512 * 512) * 8
    assert counted - estimate_memory((256, 256), 12, 100, exact_posterior=False, **few).prediction == \
        max(windows, draws) - draws > 0  # (the windows' more where there are fewer than 12 CPU cores)


def test_coarse_space_of_the_schur_complement_by_cg_is_counted():
    without = estimate_memory((256, 256), 6, 100, n_missing=8000, schur_cg=True)
    with_coarse = estimate_memory((256, 256), 6, 100, n_missing=8000, schur_cg=True, n_coarse=300)
    # kernel columns and their basis (m × c), the basis rotated (n × c), six matrices of T blocks c × c
    assert with_coarse.fitting - without.fitting == ((2 * 8000 + 256 * 256) * 300 + 6 * 6 * 300**2) * 8
    # One lattice per number of whitened maps that get the coarse space: the worst is counted.
    per_maps = [900, 640, 520, 450, 400, 300]  # finer for fewer maps
    worst = max((2 * 8000 + 256 * 256) * c + 6 * t * c**2 for t, c in enumerate(per_maps, start=1))
    sized = estimate_memory((256, 256), 6, 100, n_missing=8000, schur_cg=True, n_coarse=per_maps)
    assert sized.fitting - without.fitting == worst * 8
    assert worst == (2 * 8000 + 256 * 256) * 900 + 6 * 900**2  # here one map's finer lattice


def test_tile_blocks_the_mask_gives_replace_the_bound():
    """``n_jacobi_values`` (the blocks a mask's tiles give, larger tiles for masked regions) is what is counted."""
    bound = estimate_memory((256, 256), 6, 100, n_missing=18000, schur_cg=True)
    given = estimate_memory((256, 256), 6, 100, n_missing=18000, schur_cg=True, n_jacobi_values=600 * 216**2)
    # the blocks and their factors; the bound: k values per pixel and whitened map (fewer than k² per missing
    # pixel)
    assert given.fitting - bound.fitting == 2 * (600 * 216**2 - 6 * 65536 * JACOBI_TILE_PIXELS) * 8


def _resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not memory._malloc_trim(), reason="malloc_trim is glibc's (Linux); other C libraries lack it")
def test_freed_heap_blocks_go_back_to_the_system():
    # Blocks of 4 MB, kept in the heap once a freed mmapped one has raised glibc's
    # dynamic threshold; freeing all but the last leaves them there (nothing at the
    # heap's top to trim on its own).
    import numpy as np

    np.ones(4 * 2**20 // 8)  # allocated and freed: the threshold rises to 4 MB
    blocks = [np.ones(4 * 2**20 // 8 - 64) for _ in range(48)]  # 192 MB, touched
    del blocks[:-1]
    before = _resident_bytes()
    assert memory.release_freed_memory()
    assert before - _resident_bytes() > 100 * 2**20
