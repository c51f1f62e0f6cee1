"""Mode products on grid tensors, against einsum."""

import pytest
import torch

from hyperspy_gp.gp.tensor import blocks_dot, kron_dot, mode_dot, task_first

_LETTERS = "abcdefgh"


def _reference(x, matrix, axis):
    spatial = _LETTERS[: x.dim() - 2]
    out = spatial[:axis] + "z" + spatial[axis + 1 :]
    return torch.einsum(f"pz{spatial[axis]},p{spatial}t->p{out}t", matrix, x)


@pytest.mark.parametrize(
    ("grid", "trailing", "m"),
    [
        ((7, 5), 3, 9),  # first axis: one GEMM; last axis, few values after it: moved last
        ((7, 5), 40, 9),  # many values after the last axis: in place
        ((4, 6, 5), 2, 8),  # a middle axis with few values after it
        ((4, 6, 5), 30, 3),
        ((11,), 4, 6),
    ],
)
@pytest.mark.parametrize("batch", [(1, 1), (3, 3), (3, 1)])  # (P of x, P of the matrix): shared or broadcast
def test_mode_dot_matches_einsum_on_every_axis(grid, trailing, m, batch):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch[0], *grid, trailing, generator=generator, dtype=torch.float64)
    for axis, n in enumerate(grid):
        matrix = torch.randn(batch[1], m, n, generator=generator, dtype=torch.float64)
        expected = _reference(x, matrix.expand(batch[0], m, n), axis)
        torch.testing.assert_close(mode_dot(x, matrix, axis), expected, rtol=1e-12, atol=1e-12)
        # a transposed (non-contiguous) input, as a previous product may leave it
        xt = x.transpose(1, -1).contiguous().transpose(1, -1)
        torch.testing.assert_close(mode_dot(xt, matrix, axis), expected, rtol=1e-12, atol=1e-12)


def test_kron_dot_skips_axes_without_a_matrix():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 4, 3, generator=generator, dtype=torch.float64)
    a = torch.randn(2, 5, 6, generator=generator, dtype=torch.float64)
    b = torch.randn(2, 7, 4, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(kron_dot(x, [a, b]), torch.einsum("pim,pjn,pmnt->pijt", a, b, x))
    torch.testing.assert_close(kron_dot(x, [None, b]), mode_dot(x, b, 1))


@pytest.mark.parametrize("grid", [(5, 4), (6,), (3, 4, 2)])
@pytest.mark.parametrize("tasks", [(1, 1), (3, 3), (2, 4)])  # (S, T): one map, square and rectangular blocks
def test_blocks_dot_applies_each_grid_points_own_block(grid, tasks):
    generator = torch.Generator().manual_seed(2)
    s, t = tasks
    blocks = torch.randn(2, *grid, s, t, generator=generator, dtype=torch.float64)  # (P, *grid, S, T)
    x = torch.randn(2, 3, t, *grid, generator=generator, dtype=torch.float64)  # (P, R, T, *grid)
    first = task_first(blocks)
    assert first.shape == (2, s, t, *grid) and first.is_contiguous()
    expected = torch.einsum("p...st,prt...->prs...", blocks, x)
    torch.testing.assert_close(blocks_dot(first, x), expected, rtol=1e-13, atol=1e-13)
    # one point by hand: its block times its vector
    point = (1, 2, slice(None), *[n - 1 for n in grid])
    torch.testing.assert_close(blocks_dot(first, x)[point], blocks[(1, *[n - 1 for n in grid])] @ x[point])


def test_blocks_dot_keeps_autograd():
    generator = torch.Generator().manual_seed(3)
    blocks = torch.randn(1, 2, 3, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)  # (P, S, T, *g)
    x = torch.randn(1, 6, 3, 4, 5, generator=generator, dtype=torch.float64)  # (P, R, T, *g)
    blocks_dot(blocks, x).sum().backward()
    # d/d blocks[p, s, t, g] of the sum is Σ_r x[p, r, t, g], for every s
    torch.testing.assert_close(blocks.grad, x.sum(1, keepdim=True).expand(1, 2, 3, 4, 5))
