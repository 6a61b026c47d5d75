"""The bias-map linear algebra: separable resizing and pooling as matrix
products, equal to PyTorch's interpolation and pooling kernels."""
import math

import pytest
import torch

from agent_mm.models import bias_maps
from agent_mm.models.bias_maps import (batched_matmul, builds_by_product,
                                       interpolation_matrix, left_matmul,
                                       linear_weights, on_agent_grid,
                                       pool_tokens, pooling_matrix, resize,
                                       resize_by_matmul, resize_rows_into,
                                       resize_tokens, row_runs, separable_bias,
                                       to_agent_grid)
from agent_mm.models.layers import map_to_tokens, tokens_to_map


@pytest.mark.parametrize('batch_shape', [(), (3, ), (2, 4)])
def test_left_matmul_is_a_contiguous_matrix_product(batch_shape):
    matrix = torch.randn(6, 5)
    x = torch.randn(*batch_shape, 5, 7, requires_grad=True)
    out = left_matmul(matrix, x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, matrix @ x)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, matrix.t() @ grad)


def test_batched_matmul_writes_the_product_into_out_in_its_dtype():
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5, 6)
    assert batched_matmul(a, b).is_contiguous()
    torch.testing.assert_close(batched_matmul(a, b), a @ b)
    out = torch.empty(2, 3, 4, 6, dtype=torch.bfloat16)
    product = batched_matmul(a, b, out)
    assert product.data_ptr() == out.data_ptr()
    assert product.dtype == torch.bfloat16
    torch.testing.assert_close(product.float(), a @ b, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize('size_in, size_out', [((7, 7), (64, 48)),
                                               ((56, 56), (25, 42)),
                                               ((3, 3), (12, 12)),
                                               ((14, 9), (14, 9)),
                                               ((1, 5), (1, 11))])
def test_resize_by_matmul_is_bilinear_resizing(size_in, size_out):
    x = torch.randn(2, 5, *size_in)
    torch.testing.assert_close(
        resize_by_matmul(x, size_out),
        resize(x, size_out),
        atol=1e-5,
        rtol=1e-5)


# divisible, uneven and overlapping bins (more agents than tokens)
@pytest.mark.parametrize('hw, size', [((56, 56), (7, 7)), ((25, 42), (12, 12)),
                                      ((5, 3), (7, 7)), ((13, 1), (4, 2))])
def test_pool_tokens_is_adaptive_average_pooling(hw, size):
    # queries as a strided view of a fused projection, as in Agent-Swin
    qkv = torch.randn(
        2, hw[0] * hw[1], 3 * 6, dtype=torch.float64, requires_grad=True)
    query = qkv[..., 6:12]
    grad = torch.randn(2, size[0] * size[1], 6, dtype=torch.float64)
    pooled = pool_tokens(query, hw, size)
    expected = map_to_tokens(
        torch.nn.functional.adaptive_avg_pool2d(
            tokens_to_map(query, hw), size))
    torch.testing.assert_close(pooled, expected)
    ours, = torch.autograd.grad(pooled, qkv, grad)
    want, = torch.autograd.grad(expected, qkv, grad)
    torch.testing.assert_close(ours, want)


@pytest.mark.parametrize('hw, size', [((14, 14), (64, 48)), ((7, 7), (7, 9)),
                                      ((56, 56), (25, 42)), ((1, 3), (4, 4))])
def test_resize_tokens_is_bilinear_resizing_of_the_token_map(hw, size):
    x = torch.randn(
        2, hw[0] * hw[1], 6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, size[0] * size[1], 6, dtype=torch.float64)
    resized = resize_tokens(x, hw, size)
    expected = map_to_tokens(resize(tokens_to_map(x, hw), size))
    close = dict(atol=1e-6, rtol=1e-5)  # float32 interpolation weights
    torch.testing.assert_close(resized, expected, **close)
    ours, = torch.autograd.grad(resized, x, grad)
    want, = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(ours, want, **close)


def test_on_agent_grid_resizes_each_tokens_agent_map():
    source = torch.randn(3, 16, 5, 6)
    mapped = on_agent_grid(source, (7, 9))
    per_token = source.permute(0, 2, 3, 1).reshape(90, 1, 4, 4)
    expected = resize(per_token, (7, 9)).reshape(3, 5, 6, 63)
    torch.testing.assert_close(mapped, expected, atol=1e-5, rtol=1e-5)


# up (the models' 7 rows to token grids), down, equal, from a single row
@pytest.mark.parametrize('size_in, size_out', [(7, 50), (7, 200), (14, 9),
                                               (7, 7), (2, 9), (1, 5)])
def test_resize_rows_into_is_linear_resizing_plus_the_row_term(
        size_in, size_out):
    runs, fractions = row_runs(size_in, size_out)
    # consecutive runs covering every output row once
    assert [run[1] for run in runs] == [0] + [run[2] for run in runs[:-1]]
    assert runs[-1][2] == size_out and fractions.shape == (size_out, )
    src = torch.randn(3, size_in, 4, 5, dtype=torch.float64)
    row_term = torch.randn(3, size_out, 1, 5, dtype=torch.float64)
    out = torch.full((3, size_out, 4, 5), float('nan'), dtype=torch.float64)
    assert resize_rows_into(out, src, row_term) is out
    expected = torch.einsum('yi,bixa->byxa', linear_weights(size_in, size_out),
                            src) + row_term
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('into_out', [False, True])
def test_a_token_major_map_without_autograd_is_built_by_rows(
        dtype, into_out, maps_by_rows):
    sources = [
        torch.randn(2, 16, 7, 7, dtype=dtype, requires_grad=True),
        torch.randn(2, 16, 14, 1, dtype=dtype, requires_grad=True),
        torch.randn(2, 16, 1, 14, dtype=dtype, requires_grad=True)
    ]
    grids = (25, 42), (12, 12)
    with torch.no_grad():
        products = separable_bias(*sources, *grids, True)
        assert not maps_by_rows
        out = torch.empty_like(products) if into_out else None
        bias = separable_bias(
            *sources, *grids, True, out=out, differentiable=False)
    assert len(maps_by_rows) == 1 and bias.is_contiguous()
    if into_out:
        assert bias.data_ptr() == out.data_ptr()
    # the same values to the rounding of float32 (the resizing weights'
    # precision); a float32 map sums its terms in float32
    torch.testing.assert_close(bias, products, atol=2e-6, rtol=1e-5)
    literal = literal_bias(*sources, *grids)
    atol = 1e-6 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(bias, literal, atol=atol, rtol=1e-5)


def test_maps_that_autograd_records_or_in_bfloat16_keep_the_products(
        maps_by_rows):
    sources = [
        torch.randn(2, 16, 7, 7, requires_grad=True),
        torch.randn(2, 16, 14, 1),
        torch.randn(2, 16, 1, 14)
    ]
    grids = (25, 42), (12, 12)
    # gradients enabled for a trained source: recorded, whatever is asked
    bias = separable_bias(*sources, *grids, True, differentiable=False)
    assert bias.requires_grad
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        separable_bias(*sources, *grids, True, differentiable=False)
    # agent-major maps are one product per agent in any case
    with torch.no_grad():
        separable_bias(*sources, *grids, False, differentiable=False)
    assert not maps_by_rows


def literal_bias(full, rows, cols, hw, agent_shape):
    """The authors' order: sum the sources as maps, resize to the token
    grid, then map every token's agents; ``(heads, H*W, n)``."""
    return (to_agent_grid(resize(full, hw), agent_shape) +
            to_agent_grid(resize(rows, hw), agent_shape) +
            to_agent_grid(resize(cols, hw), agent_shape))


# (f_h, f_w) of the full source, r_h and r_w of the row and column sources;
# token grids larger, smaller and equal to the sources, more agents than
# tokens
@pytest.mark.parametrize('full_hw, rows_cols, hw, agent_shape', [
    ((7, 7), (56, 56), (64, 48), (12, 12)),
    ((7, 7), (14, 14), (25, 42), (28, 28)),
    ((7, 7), (14, 9), (14, 9), (2, 3)),
    ((7, 7), (7, 7), (3, 5), (7, 7)),
    ((5, 3), (1, 6), (9, 1), (4, 4)),
])
@pytest.mark.parametrize('token_major', [False, True])
def test_separable_bias_is_the_literal_bias_in_either_layout(
        full_hw, rows_cols, hw, agent_shape, token_major, bias_build):
    sources = [
        torch.randn(2, 16, *full_hw, dtype=torch.float64, requires_grad=True),
        torch.randn(
            2, 16, rows_cols[0], 1, dtype=torch.float64, requires_grad=True),
        torch.randn(
            2, 16, 1, rows_cols[1], dtype=torch.float64, requires_grad=True)
    ]
    bias = separable_bias(*sources, hw, agent_shape, token_major)
    literal = literal_bias(*sources, hw, agent_shape)
    if not token_major:
        literal = literal.transpose(1, 2)
    assert bias.is_contiguous()
    # the interpolation weights are float32 (the models' precision)
    close = dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bias, literal, **close)
    grad = torch.randn_like(bias)
    ours = torch.autograd.grad(bias, sources, grad)
    want = torch.autograd.grad(literal, sources, grad)
    for got, expected in zip(ours, want):
        torch.testing.assert_close(got, expected, **close)


@pytest.mark.parametrize('token_major', [False, True])
@pytest.mark.parametrize('how', ['autocast', 'out'])
def test_separable_bias_in_bfloat16_is_the_float32_bias_rounded(
        token_major, how, bias_build):
    # 16-bit maps are built by other products than float32 ones (the row
    # term inside the product in the token-major separable layout)
    sources = [
        torch.randn(2, 16, 7, 7),
        torch.randn(2, 16, 14, 1),
        torch.randn(2, 16, 1, 14)
    ]
    grids = (25, 42), (12, 12)
    expected = separable_bias(*sources, *grids, token_major)
    if how == 'autocast':
        with torch.autocast('cpu', torch.bfloat16):
            bias = separable_bias(*sources, *grids, token_major)
    else:
        out = torch.empty_like(expected, dtype=torch.bfloat16)
        bias = separable_bias(*sources, *grids, token_major, out=out)
        assert bias.data_ptr() == out.data_ptr()
    assert bias.dtype == torch.bfloat16 and bias.is_contiguous()
    torch.testing.assert_close(bias.float(), expected, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize('trained', [False, True])
def test_small_maps_are_built_by_the_dense_product(trained):
    # (heads, agents, tokens, inner): Agent-PVT-T's stage 1 at 224 pixels
    # with 8x8 agents, as in the detection quick-start, and at 1024 pixels
    # with the paper's 12x12 agents
    quick_start, paper = (1, 64, 56 * 56, 161), (1, 144, 256 * 256, 161)
    for dtype in (torch.float32, torch.bfloat16):
        assert builds_by_product(*quick_start, dtype, trained)
        # the token-grid matrix is bounded on its own
        assert not builds_by_product(*paper, dtype, trained)
    # stage 3 at 512 pixels with the paper's 28x28 agents
    large = (5, 784, 32 * 32, 77)
    assert math.prod(large) > 4 * bias_maps.DENSE_MAX_MACS
    assert not builds_by_product(*large, torch.float32, trained)
    # in 16-bit, dense when trained; else a product counts half
    assert builds_by_product(*large, torch.bfloat16, trained) is trained
    middle = (2, 64, 2**20 // 256, 256)
    macs = bias_maps.DENSE_MAX_MACS
    assert macs < math.prod(middle) <= 2 * macs
    assert not builds_by_product(*middle, torch.float32, trained)
    assert builds_by_product(*middle, torch.bfloat16, trained)


def test_separable_bias_builds_by_the_rule(monkeypatch):
    asked = []
    monkeypatch.setattr(bias_maps, 'builds_by_product',
                        lambda *args: asked.append(args) or False)
    sources = [torch.randn(2, 9, 7, 7), torch.randn(2, 9, 14, 1),
               torch.randn(2, 9, 1, 12)]
    separable_bias(*sources, (25, 42), (8, 6), True)
    sources[0].requires_grad_()
    with torch.autocast('cpu', torch.bfloat16):
        separable_bias(*sources, (25, 42), (8, 6), False)
    # trained sources whatever the grad mode: shared_bias_attention builds
    # the map without autograd in forward, and with it in backward
    with torch.no_grad():
        separable_bias(*sources, (25, 42), (8, 6), False)
    dims = (2, 48, 25 * 42, 7 * 7 + 14 + 12)
    assert asked == [(*dims, torch.float32, False),
                     (*dims, torch.bfloat16, True),
                     (*dims, torch.float32, True)]


@pytest.mark.parametrize('matrix', [interpolation_matrix, pooling_matrix])
def test_weights_first_made_in_inference_mode_serve_autograd(matrix):
    matrix.cache_clear()
    with torch.inference_mode():
        first = matrix(9, 4)
    x = torch.randn(9, 2, requires_grad=True)
    (matrix(9, 4) @ x).sum().backward()
    assert matrix(9, 4) is first and not first.is_inference()
    expected = first.sum(0).unsqueeze(1).expand(9, 2)
    torch.testing.assert_close(x.grad, expected)
