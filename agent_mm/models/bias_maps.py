"""The linear algebra of agent attention's position biases.

Each bias is learned on small grids (7×7 per agent, or a row / column of the
224-pixel token grid) and bilinearly resized to the current token grid and
agent grid. Bilinear resizing and adaptive average pooling are separable, so
they are computed here as small matrix products, in the order and layout
that is cheapest for the large maps the attention kernels read.

The resizing and pooling weights are cached per size, except in a graph
being traced (:func:`~agent_mm.models.tracing.tracing`): there they are
computed by the graph, for its own (possibly dynamic) sizes, and no cache
ever holds a tensor of a trace.
"""
import functools
import math
from typing import Callable, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .tracing import tracing

# A side of a grid: an int, or in a traced graph a symbolic int or a 0-dim
# tensor.
Size = Union[int, torch.SymInt, Tensor]


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize (``align_corners=False``) of a ``(B, C, h, w)`` map."""
    return F.interpolate(
        x, size=tuple(size), mode='bilinear', align_corners=False)


def to_agent_grid(source: Tensor, agent_shape: Tuple[int, int]) -> Tensor:
    """Map a per-token bias onto the agent grid.

    Args:
        source: ``(heads, p*p, H, W)``, one ``p×p`` bias per token.
        agent_shape: ``(a_h, a_w)`` agent grid.

    Returns:
        ``(heads, H*W, a_h*a_w)``.
    """
    heads, agent_num, height, width = source.shape
    side = math.isqrt(agent_num)
    per_token = source.reshape(heads, side, side, height * width)
    per_token = per_token.permute(0, 3, 1, 2)
    return resize(per_token, agent_shape).flatten(2)


@functools.lru_cache(maxsize=128)
def interpolation_matrix(size_in: int, size_out: int) -> Tensor:
    """``(size_out, size_in)`` weights of 1-D linear resizing
    (``align_corners=False``), the per-axis factor of bilinear resizing."""
    basis = torch.eye(size_in, dtype=torch.float64).unsqueeze(0)
    weights = F.interpolate(
        basis, size=size_out, mode='linear', align_corners=False)
    return weights[0].t().float()


@functools.lru_cache(maxsize=128)
def pooling_matrix(size_in: Size, size_out: int) -> Tensor:
    """``(size_out, size_in)`` weights of 1-D adaptive average pooling: bin
    ``i`` averages ``[floor(i*in/out), ceil((i+1)*in/out))``. Tensor
    operations on non-negative integers only (ONNX divides integers towards
    zero), so a traced graph computes them for its own sizes."""
    bins = torch.arange(size_out).unsqueeze(1)
    start = bins * size_in // size_out
    end = ((bins + 1) * size_in + size_out - 1) // size_out
    cols = torch.arange(size_in)
    inside = (cols >= start) & (cols < end)
    return inside.float() / (end - start).float()


def weights_like(matrix: Callable[[Size, Size], Tensor], size_in: Size,
                 size_out: Size, like: Tensor) -> Tensor:
    """``matrix(size_in, size_out)`` on ``like``'s device and dtype, from
    its cache unless a graph is being traced
    (:func:`~agent_mm.models.tracing.tracing`)."""
    if tracing():
        matrix = matrix.__wrapped__
    return matrix(size_in, size_out).to(like)


def resize_matrices(in_hw: Sequence[int], size: Sequence[Size],
                    like: Tensor) -> Tuple[Tensor, Tensor]:
    """Row ``(H, h)`` and column ``(W, w)`` weights of bilinear resizing
    from ``in_hw`` to ``size``, on ``like``'s device and dtype."""
    return (weights_like(interpolation_matrix, in_hw[0], size[0], like),
            weights_like(interpolation_matrix, in_hw[1], size[1], like))


def left_matmul(matrix: Tensor, x: Tensor) -> Tensor:
    """``matrix @ x`` for a 2-D ``matrix`` and a batch ``x`` of shape
    ``(..., k, m)``, as one batched product with a contiguous result.

    ``torch.matmul`` computes this case as ``(xᵀ @ matrixᵀ)ᵀ``: it copies
    ``x`` into a transposed layout and returns a transposed view, which the
    next operation copies again, forward and backward (most of the cost of
    building the large bias maps).
    """
    batch = x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:])
    out = torch.bmm(matrix.expand(batch.shape[0], *matrix.shape), batch)
    return out.reshape(*x.shape[:-2], *out.shape[-2:])


def resize_by_matmul(x: Tensor, size: Sequence[int]) -> Tensor:
    """:func:`resize` of ``(..., h, w)`` as two small matrix products.

    Bilinear resizing is separable; with many channels and small maps, as
    for the position biases, the products are much faster than the
    interpolation kernel, forward and backward.
    """
    rows, cols = resize_matrices(x.shape[-2:], size, x)
    return left_matmul(rows, x) @ cols.t()


def pool_tokens(x: Tensor, hw_shape: Sequence[int],
                size: Sequence[int]) -> Tensor:
    """``F.adaptive_avg_pool2d`` of ``(B, H*W, C)`` tokens laid out as
    ``hw_shape`` to ``size``, returned as ``(B, h*w, C)`` tokens.

    Computed as two small matrix products, along the width then the height,
    on the tokens as they are (a strided view of a fused projection too):
    the pooling kernel would first copy the channels-last map to NCHW, a
    full-size copy several times the cost of the pooling at high
    resolution.
    """
    batch, _, channels = x.shape
    (height, width), (out_h, out_w) = hw_shape, size
    pool_h = weights_like(pooling_matrix, height, out_h, x)
    pool_w = weights_like(pooling_matrix, width, out_w, x)
    rows = left_matmul(pool_w, x.reshape(batch * height, width, channels))
    pooled = left_matmul(pool_h, rows.reshape(batch, height, out_w * channels))
    return pooled.reshape(batch, out_h * out_w, channels)


def mapped_source(source: Tensor, hw_shape: Tuple[int, int],
                  agent_shape: Tuple[int, int], token_major: bool) -> Tensor:
    """``to_agent_grid(resize(source, hw_shape), agent_shape)`` computed in
    the cheap order, in either layout.

    The two bilinear resizes act on different axes (tokens and agents), so
    they commute: mapping the agents on the source's small grid first leaves
    one resize of ``heads*n`` channels to the token grid, instead of
    resizing ``H*W`` tiny ``p×p`` maps; both are done by
    :func:`resize_by_matmul`-style matrix products, and the token-major
    result is produced directly in its layout (transposing a large map is
    slow). A source axis of size 1 stays 1 (the map is constant along it),
    so a separable source ``a[h] + b[w]`` can be mapped term by term and
    summed by broadcasting: the interpolation weights of every output pixel
    sum to one.

    Args:
        source: ``(heads, p*p, h, w)``.
        hw_shape: Token grid ``(H, W)``.
        agent_shape: Agent grid ``(a_h, a_w)``.
        token_major: Layout of the result.

    Returns:
        ``(heads, H', W', n)`` if ``token_major`` else ``(heads, n, H',
        W')``, with ``n = a_h*a_w``, ``H' = 1 if h == 1 else H`` and
        likewise ``W'``.
    """
    heads, agent_num, height, width = source.shape
    side = math.isqrt(agent_num)
    per_token = source.reshape(heads, side, side, height * width)
    per_agent = resize_by_matmul(per_token.permute(0, 3, 1, 2), agent_shape)
    size = (hw_shape[0] if height > 1 else 1, hw_shape[1] if width > 1 else 1)
    if not token_major:
        per_agent = per_agent.flatten(2).transpose(1, 2).reshape(
            heads, -1, height, width)
        return resize_by_matmul(per_agent, size)
    # (heads, h, w, n): resize w, then h with the other axes flattened
    rows, cols = resize_matrices((height, width), size, source)
    per_agent = per_agent.reshape(heads, height, width, -1)
    mapped = left_matmul(rows, left_matmul(cols, per_agent).flatten(2))
    return mapped.reshape(heads, size[0], size[1], -1)


def separable_bias(full: Tensor, rows: Tensor, cols: Tensor,
                   hw_shape: Tuple[int, int], agent_shape: Tuple[int, int],
                   token_major: bool) -> Tensor:
    """One bias of agent attention from its three sources, each mapped by
    :func:`mapped_source` and summed by broadcasting.

    Args:
        full: ``(heads, p*p, 7, 7)`` source.
        rows: ``(heads, p*p, r_h, 1)`` source.
        cols: ``(heads, p*p, 1, r_w)`` source.
        hw_shape: Token grid ``(H, W)``.
        agent_shape: Agent grid ``(a_h, a_w)``.
        token_major: Return ``(heads, N, n)`` instead of ``(heads, n, N)``.

    Returns:
        A contiguous map: the attention kernels read it row by row.
    """
    full, rows, cols = (
        mapped_source(src, hw_shape, agent_shape, token_major)
        for src in (full, rows, cols))
    # `full` is a view of a product: adding into it in place would make
    # autograd copy the whole map twice in backward
    bias = (full + rows).add_(cols)
    return bias.flatten(1, 2) if token_major else bias.flatten(2)
