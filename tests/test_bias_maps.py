"""The bias-map linear algebra: separable resizing and pooling as matrix
products, equal to PyTorch's interpolation and pooling kernels."""
import pytest
import torch

from agent_mm.models.bias_maps import (left_matmul, mapped_source, pool_tokens,
                                       resize, resize_by_matmul, to_agent_grid)
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


@pytest.mark.parametrize('source_hw, hw, agent_shape', [
    ((7, 7), (64, 48), (12, 12)),
    ((56, 56), (25, 42), (28, 28)),
    ((14, 14), (14, 14), (2, 3)),
    ((7, 7), (3, 5), (7, 7)),
])
def test_mapped_source_is_the_literal_map_computed_in_another_order(
        source_hw, hw, agent_shape):
    source = torch.randn(3, 16, *source_hw)
    literal = to_agent_grid(resize(source, hw), agent_shape)
    agents = agent_shape[0] * agent_shape[1]
    agent_major = mapped_source(source, hw, agent_shape, token_major=False)
    token_major = mapped_source(source, hw, agent_shape, token_major=True)
    assert agent_major.shape == (3, agents, *hw)
    assert token_major.shape == (3, *hw, agents)
    torch.testing.assert_close(
        agent_major.flatten(2), literal.transpose(1, 2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        token_major.flatten(1, 2), literal, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('token_major', [False, True])
@pytest.mark.parametrize('hw', [(64, 48), (5, 9), (56, 56)])
def test_separable_source_maps_term_by_term(hw, token_major):
    rows, cols = torch.randn(2, 9, 56, 1), torch.randn(2, 9, 1, 56)
    literal = to_agent_grid(resize(rows + cols, hw), (12, 12))
    row_map = mapped_source(rows, hw, (12, 12), token_major)
    col_map = mapped_source(cols, hw, (12, 12), token_major)
    grid_axes = slice(1, 3) if token_major else slice(2, 4)
    assert row_map.shape[grid_axes] == (hw[0], 1)
    assert col_map.shape[grid_axes] == (1, hw[1])
    summed = row_map + col_map
    summed = summed.flatten(
        1, 2) if token_major else summed.flatten(2).transpose(1, 2)
    torch.testing.assert_close(summed, literal, atol=1e-5, rtol=1e-5)
