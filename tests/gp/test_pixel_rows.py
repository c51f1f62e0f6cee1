"""The rows of a Kronecker eigenbasis at a few pixels, against the formed rows ``V``."""

import pytest
import torch

from hyperspy_gp import memory
from hyperspy_gp.gp.pixel_rows import PixelRows
from hyperspy_gp.gp.tensor import kron_rows


def _rows(shape, n_models=2, seed=0):
    """Random orthogonal factors, a random set of pixels, and the formed ``V`` ``(P, n, m)``."""
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.linalg.qr(torch.randn(n_models, n, n, generator=gen, dtype=torch.float64))[0] for n in shape]
    missing = torch.rand(shape, generator=gen) < 0.3
    missing.reshape(-1)[-1] = True  # at least one pixel, on the last line
    pixels = torch.nonzero(missing)
    formed = kron_rows(factors, pixels).flatten(2).transpose(1, 2)
    return PixelRows.build(factors, pixels), formed, gen


SHAPES = [(7, 9), (12,), (5, 4, 3), (1, 6), (6, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_gram_and_quadratic_diagonal_equal_the_products_of_the_formed_rows(shape, monkeypatch):
    monkeypatch.setattr(memory, "PIXEL_ROWS_CHUNK_VALUES", 16)  # several chunks of pixels
    rows, v, gen = _rows(shape)
    n_models, n, m = v.shape
    weights = torch.rand(n_models, 3, shape[0], n // shape[0], generator=gen, dtype=torch.float64)
    expected = torch.einsum("pjm,pkj,pjl->pkml", v, weights.flatten(2), v)
    assert torch.allclose(rows.gram(weights), expected, atol=1e-13)
    x = torch.randn(n_models, 3, m, m, generator=gen, dtype=torch.float64)
    x = x + x.transpose(-1, -2)
    expected = torch.einsum("pjm,pkml,pjl->pkj", v, x, v)
    assert torch.allclose(rows.quadratic_diagonal(x).flatten(2), expected, atol=1e-13)


@pytest.mark.parametrize("shape", SHAPES)
def test_values_at_the_pixels_and_spread_are_the_products_with_the_formed_rows(shape):
    rows, v, gen = _rows(shape)
    n_models, n, m = v.shape
    x = torch.randn(n_models, 4, 3, shape[0], n // shape[0], generator=gen, dtype=torch.float64)
    assert torch.allclose(rows.values_at(x), torch.einsum("pjm,prtj->prtm", v, x.flatten(3)), atol=1e-13)
    u = torch.randn(n_models, 4, 3, m, generator=gen, dtype=torch.float64)
    assert torch.allclose(rows.spread(u).flatten(3), torch.einsum("pjm,prtm->prtj", v, u), atol=1e-13)
