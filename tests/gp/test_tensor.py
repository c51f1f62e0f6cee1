"""Mode products on grid tensors, against einsum."""

import pytest
import torch

from hyperspy_gp.gp.tensor import kron_dot, mode_dot

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
