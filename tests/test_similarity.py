"""The synthetic similarity benchmark (the paper's Figs. 4-8 protocol).

The qualitative findings are checked at a few grid points of 32×32 maps with a fixed
seed.  Each was first measured over the whole (σ0, α) grid and over seeds 0-4; the
margins below hold for all of them.
"""

import importlib.util
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from hyperspy_gp.similarity import (
    DEFAULT_CONFIGURATIONS,
    Configuration,
    noise_levels,
    similarity_benchmark,
)

SHAPE = (32, 32)
INDEPENDENT_FREE, PARALLEL_FREE = DEFAULT_CONFIGURATIONS[0], DEFAULT_CONFIGURATIONS[1]
INDEPENDENT_GOOD = DEFAULT_CONFIGURATIONS[2]
WRONG = DEFAULT_CONFIGURATIONS[4:]
MAP1, MAP2, MAP3 = 0, 1, 2


def _gain(result, better, worse):
    return result.similarity[result.index(better.name)] - result.similarity[result.index(worse.name)]


@pytest.mark.parametrize("noise_model", [1, 2])
def test_parallel_gp_helps_the_maps_that_share_structure_more_than_the_dissimilar_one(noise_model):
    result = similarity_benchmark([0.2, 0.4], [2.0], noise_model, [INDEPENDENT_FREE, PARALLEL_FREE], SHAPE, seed=0)
    gain = _gain(result, PARALLEL_FREE, INDEPENDENT_FREE)  # (σ0, α, map)
    # Map 3 borrows map 1's (cleaner) structure: a large gain at every point ...
    assert (gain[..., MAP3] > 0.15).all()
    assert (gain[..., MAP3] > gain[..., MAP2] + 0.15).all()
    # ... map 1, the least noisy, loses nothing.
    assert (gain[..., MAP1] > -0.02).all()


def test_wrong_bounds_lose_maps_1_and_3_already_at_low_noise():
    configurations = [INDEPENDENT_FREE, *WRONG]
    result = similarity_benchmark([0.0, 0.1], [1.0], 2, configurations, SHAPE, seed=0)
    free = result.similarity[0]
    assert (free > 0.95).all()  # the data are easy ...
    for config in WRONG:
        wrong = result.similarity[result.index(config.name)]
        # ... but a 10-11 px length scale cannot follow the 8 px sines of maps 1 and 3,
        # even without noise; the fit calls them noise.
        assert (wrong[..., [MAP1, MAP3]] < 0.2).all(), config.name
    # Map 2 (period 16 px along x) survives in the parallel model at low noise.
    assert result.similarity[result.index(WRONG[1].name), 1, 0, MAP2] > 0.9


def test_bounds_at_the_intrinsic_length_scale_versus_free_kernels():
    """What the engine does, measured (the paper's claim is only half reproduced).

    At low noise the [2, 5] px bounds hold the fit at the sines' length scale and do
    at least as well as free kernels.  As noise grows, the free fit's length scale
    shrinks below 2 px and it degrades gracefully, while the bounded fit, held at
    ≥ 2 px, smooths the 8 px period away faster: the bounds do *not* extend the good
    region to higher noise here (the paper reports they do).  The paper's non-separable
    kernel behaves the same (σ0 = 0.7, map 1: NCC 0.42 free vs 0.32 bounded; free
    length scale 0.6 px).
    """
    result = similarity_benchmark([0.2, 0.7], [1.0], 2, [INDEPENDENT_FREE, INDEPENDENT_GOOD], SHAPE, seed=0)
    free, bounded = result.similarity[0, :, 0, MAP1], result.similarity[1, :, 0, MAP1]
    ls_free, ls_bounded = result.lengthscales[0, :, 0, MAP1], result.lengthscales[1, :, 0, MAP1]
    assert (ls_free < 2.0).all()
    assert ((ls_bounded >= 2.0 - 1e-9) & (ls_bounded <= 5.0 + 1e-9)).all()
    assert bounded[0] >= free[0] - 0.01  # low noise: as good
    assert free[1] > bounded[1] + 0.1  # high noise: free kernels ahead


# ------------------------------------------------------------------ protocol


def test_noise_models():
    np.testing.assert_array_equal(noise_levels(0.25, 2.0, 1), [0.0, 0.5, 0.5])
    np.testing.assert_array_equal(noise_levels(0.25, 2.0, 2), [0.25, 0.5, 0.5])
    with pytest.raises(ValueError, match="noise_model"):
        noise_levels(0.25, 2.0, 3)


def test_all_grid_points_share_one_noise_draw():
    result = similarity_benchmark([0.1, 0.2, 0.4], [1.0, 2.0], 2, [PARALLEL_FREE], (16, 16), seed=3)
    noisy = result.noisy_similarity
    # The same draw scaled up: similarity of the noisy input falls with σ0 and with α.
    assert (np.diff(noisy, axis=0) < 0).all()
    assert (np.diff(noisy[..., [MAP2, MAP3]], axis=1) < 0).all()
    np.testing.assert_array_equal(noisy[:, 0, MAP1], noisy[:, 1, MAP1])  # σ of map 1 ignores α
    again = similarity_benchmark([0.1, 0.2, 0.4], [1.0, 2.0], 2, [PARALLEL_FREE], (16, 16), seed=3)
    np.testing.assert_array_equal(again.similarity, result.similarity)


def test_table_and_plot():
    result = similarity_benchmark([0.0, 0.3], [0.0, 4.0], 1, DEFAULT_CONFIGURATIONS[:2], (16, 16), seed=0)
    text = result.table(points=True)
    assert "noise model 1" in text and "parallel, free" in text
    assert len([line for line in text.splitlines() if line.startswith("parallel, free ")]) == 4 + 1
    fig = result.plot()
    try:
        images = [ax.images[0] for ax in fig.axes if ax.images]
        assert len(images) == 2 * 4
        rgb = images[3].get_array()
        assert rgb.shape == (2, 2, 3)
        np.testing.assert_allclose(rgb, np.clip(result.similarity[0], 0, 1))
    finally:
        plt.close(fig)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sigma0s": [-0.1]}, ValueError, "sigma0s"),
        ({"alphas": []}, ValueError, "alphas"),
        ({"noise_model": 0}, ValueError, "noise_model"),
        ({"configurations": ["parallel"]}, TypeError, "Configuration"),
        ({"configurations": [Configuration("x", "both")]}, ValueError, "mode"),
        ({"configurations": [Configuration("x", "parallel", (5.0, 2.0))]}, ValueError, "lower bound"),
        ({"configurations": [PARALLEL_FREE, PARALLEL_FREE]}, ValueError, "unique"),
        ({"shape": (8, 8)}, ValueError, "too small"),
    ],
)
def test_bad_requests_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        similarity_benchmark(**kwargs)


def test_benchmark_script_writes_figures_and_prints_a_table(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_similarity.py"
    spec = importlib.util.spec_from_file_location("bench_similarity", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--sigma0s", "2", "--alphas", "2", "--size", "16", "--noise-model", "2", "--output", str(tmp_path)]
    assert bench.main(argv) == 0
    assert (tmp_path / "similarity_model2.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "noise model 2" in out and "mean NCC" in out
