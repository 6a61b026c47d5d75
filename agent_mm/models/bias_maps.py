"""The linear algebra of agent attention's position biases.

Each bias is learned on small grids (7×7 per agent, or a row / column of the
224-pixel token grid) and bilinearly resized to the current token grid and
agent grid. Bilinear resizing and adaptive average pooling are separable, so
they are computed here as small matrix products, in the order and layout
that is cheapest for the large maps the attention kernels read. A small map
is one dense product with the two grids' resizing weights instead: a few
operations, where the separable build's hundred small ones would cost more
than the arithmetic (in training, forward and backward).

The resizing and pooling weights are cached per size, except in a graph
being traced (:func:`~agent_mm.models.tracing.tracing`): there they are
computed by the graph, for its own (possibly dynamic) sizes, and no cache
ever holds a tensor of a trace.
"""
import functools
import inspect
import math
from typing import Callable, Optional, Sequence, Tuple, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .layers import compute_dtype, plain_tensors
from .padded_agents import PADDED_AGENT_BIAS, pad_agents
from .tracing import tracing

# A side of a grid: an int, or in a traced graph a symbolic int or a 0-dim
# tensor.
Size = Union[int, torch.SymInt, Tensor]
# What a function of :func:`cached_weights` returns: a tensor, or a tuple
# holding tensors.
Weights = TypeVar('Weights')
# Bias maps are one dense product (:func:`_dense_bias`) when its token-grid
# matrix has at most this many elements (4 MB in float32) ...
DENSE_MAX_GRID_MATRIX = 2**20
# ... and, unless its sources are trained and it is built in 16-bit
# products, the product has at most this many 32-bit multiply-adds: on 2
# CPU cores, maps this small spend more time in the separable build's many
# small operations (forward and backward) than in the dense product's
# arithmetic. In 16-bit training the products are cheap beside the
# autograd passes over the map that the separable build adds, so any map
# with a small token-grid matrix is one.
DENSE_MAX_MACS = 2**26
# Token-grid matrices kept (each at most DENSE_MAX_GRID_MATRIX elements).
GRID_MATRICES_CACHED = 8


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize (``align_corners=False``) of a ``(B, C, h, w)`` map."""
    return F.interpolate(
        x, size=tuple(size), mode='bilinear', align_corners=False)


def to_agent_grid(
    source: Tensor,
    agent_shape: Tuple[int, int],
    resizer: Callable[[Tensor, Sequence[int]], Tensor] = resize
) -> Tensor:
    """Map a per-token bias onto the agent grid.

    Args:
        source: ``(heads, p*p, H, W)``, one ``p×p`` bias per token.
        agent_shape: ``(a_h, a_w)`` agent grid.
        resizer: The bilinear resize of ``(B, C, h, w)`` maps
            (:func:`resize`, the interpolation kernel, or
            :func:`resize_by_matmul`).

    Returns:
        ``(heads, H*W, a_h*a_w)``.
    """
    heads, agent_num, height, width = source.shape
    side = math.isqrt(agent_num)
    per_token = source.reshape(heads, side, side, height * width)
    per_token = per_token.permute(0, 3, 1, 2)
    return resizer(per_token, agent_shape).flatten(2)


def cached_weights(matrix: Callable[..., Weights],
                   maxsize: int = 128) -> Callable[..., Weights]:
    """``matrix(*sizes)`` cached per sizes (an LRU cache of ``maxsize``
    entries), computed as plain tensors (:func:`~.layers.plain_tensors`) so
    that weights first made inside ``torch.inference_mode()`` serve later
    forwards with autograd; ``inspect.unwrap`` gives ``matrix`` itself."""

    @functools.lru_cache(maxsize=maxsize)
    @functools.wraps(matrix)
    def cached(*sizes: Size) -> Weights:
        with plain_tensors():
            return matrix(*sizes)

    return cached


def linear_weights(size_in: int, size_out: int) -> Tensor:
    """``(size_out, size_in)`` float64 weights of 1-D linear resizing
    (``align_corners=False``), the per-axis factor of bilinear resizing."""
    basis = torch.eye(size_in, dtype=torch.float64).unsqueeze(0)
    weights = F.interpolate(
        basis, size=size_out, mode='linear', align_corners=False)
    return weights[0].t()


@cached_weights
def interpolation_matrix(size_in: int, size_out: int) -> Tensor:
    """:func:`linear_weights` in float32 (the models' precision)."""
    return linear_weights(size_in, size_out).float()


def bilinear_weights(shape_in: Tuple[int, int],
                     shape_out: Tuple[int, int]) -> Tensor:
    """``(h_out, w_out, h_in*w_in)`` float64 weights of bilinear resizing
    of a row-major ``h_in×w_in`` map: the outer product of the two axes'
    :func:`linear_weights`."""
    rows = linear_weights(shape_in[0], shape_out[0])
    cols = linear_weights(shape_in[1], shape_out[1])
    return (rows[:, None, :, None] * cols[None, :, None, :]).flatten(2)


@cached_weights
def row_runs(size_in: int,
             size_out: int) -> Tuple[Tuple[Tuple[int, int, int], ...], Tensor]:
    """:func:`linear_weights` as runs of output rows that read the same two
    neighbouring source rows: row ``y`` of a run ``(j, start, stop)`` is
    ``src[j] + t[y] * (src[j+1] - src[j])`` for ``start <= y < stop``.

    Returns:
        The runs, and the ``(size_out, )`` float64 fractions ``t`` (0 where
        a row is a source row itself, as at the edges; a run on the last
        source row has only such rows).
    """
    weights = linear_weights(size_in, size_out)
    first = (weights != 0).to(torch.int8).argmax(1)
    following = (first + 1).clamp(max=size_in - 1)
    fractions = torch.where(first + 1 < size_in,
                            weights.gather(1, following[:, None])[:, 0], 0.)
    runs, start = [], 0
    sources = first.tolist()
    for row in range(1, size_out + 1):
        if row == size_out or sources[row] != sources[start]:
            runs.append((sources[start], start, row))
            start = row
    return tuple(runs), fractions


def resize_rows_into(out: Tensor, src: Tensor, row_term: Tensor) -> Tensor:
    """Write the linear resizing (``align_corners=False``) of ``src``
    ``(B, size_in, *rest)`` along its dimension 1 into ``out`` ``(B,
    size_out, *rest)``, plus ``row_term`` (broadcast to ``out``); no
    autograd.

    Each run of :func:`row_runs` is one ``addcmul`` into its rows, and the
    row term is added while they are in the caches: a pass over ``out``,
    where a product with the ``size_in``-wide resizing weights runs at a
    fraction of the memory's speed (its inner size is a few columns).
    """
    runs, fractions = row_runs(src.shape[1], out.shape[1])
    fractions = fractions.to(src).view(-1, *[1] * (src.dim() - 2))
    steps = src[:, 1:] - src[:, :-1]
    for source, start, stop in runs:
        rows = out[:, start:stop]
        if source + 1 < src.shape[1]:
            torch.addcmul(src[:, source:source + 1], fractions[start:stop],
                          steps[:, source:source + 1], out=rows)
        else:
            rows.copy_(src[:, source:source + 1])
        rows.add_(row_term[:, start:stop])
    return out


@cached_weights
def agent_grid_matrix(side: int, agent_h: int, agent_w: int) -> Tensor:
    """``(a_h*a_w, side*side)`` weights that resize a ``side×side`` grid of
    bias agents to the agent grid (:func:`to_agent_grid`'s resizing)."""
    return bilinear_weights((side, side), (agent_h, agent_w)).flatten(
        0, 1).float()


@functools.partial(cached_weights, maxsize=GRID_MATRICES_CACHED)
def token_grid_matrix(full_h: int, full_w: int, rows_h: int, cols_w: int,
                      height: int, width: int) -> Tensor:
    """``(H*W, f_h*f_w + r_h + r_w)`` weights with which each token of an
    ``H×W`` grid reads the three sources of a bias (bilinear resizing, as
    :func:`separable_bias` takes them): the ``f_h×f_w`` full map, the
    ``r_h`` rows (constant along the width) and the ``r_w`` columns
    (constant along the height)."""
    full = bilinear_weights((full_h, full_w), (height, width))
    rows = linear_weights(rows_h, height)[:, None].expand(-1, width, -1)
    cols = linear_weights(cols_w, width).expand(height, -1, -1)
    return torch.cat([full, rows, cols], 2).flatten(0, 1).float()


@cached_weights
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


def weights_like(matrix: Callable[..., Tensor], *sizes: Size,
                 like: Tensor) -> Tensor:
    """``matrix(*sizes)`` on ``like``'s device and dtype, from its cache
    unless a graph is being traced
    (:func:`~agent_mm.models.tracing.tracing`)."""
    if tracing():
        matrix = inspect.unwrap(matrix)
    return matrix(*sizes).to(like)


def interpolation_weights(size_in: Size, size_out: Size,
                          like: Tensor) -> Tensor:
    """:func:`interpolation_matrix` on ``like``'s device and dtype."""
    return weights_like(interpolation_matrix, size_in, size_out, like=like)


def batched_matmul(a: Tensor,
                   b: Tensor,
                   out: Optional[Tensor] = None) -> Tensor:
    """``a @ b`` for batches ``(..., m, k)`` and ``(..., k, n)`` of equal
    batch shape, as one batched product with a contiguous result; written
    into ``out`` (of the result's size, its operands cast to its dtype)
    where given."""
    left = a.reshape(-1, *a.shape[-2:])
    right = b.reshape(-1, *b.shape[-2:])
    if out is None:
        product = torch.bmm(left, right)
    else:
        product = torch.bmm(
            left.to(out.dtype),
            right.to(out.dtype),
            out=out.view(len(left), left.shape[1], right.shape[2]))
    return product.reshape(*a.shape[:-1], b.shape[-1])


def left_matmul(matrix: Tensor,
                x: Tensor,
                out: Optional[Tensor] = None) -> Tensor:
    """``matrix @ x`` for a 2-D ``matrix`` and a batch ``x`` of shape
    ``(..., k, m)``, as one batched product with a contiguous result
    (written into ``out``, of its size, where given).

    ``torch.matmul`` computes this case as ``(xᵀ @ matrixᵀ)ᵀ``: it copies
    ``x`` into a transposed layout and returns a transposed view, which the
    next operation copies again, forward and backward (most of the cost of
    building the large bias maps).
    """
    return batched_matmul(matrix.expand(*x.shape[:-2], *matrix.shape), x, out)


def resize_by_matmul(x: Tensor, size: Sequence[int]) -> Tensor:
    """:func:`resize` of ``(..., h, w)`` as two small matrix products.

    Bilinear resizing is separable; with many channels and small maps, as
    for the position biases, the products are much faster than the
    interpolation kernel, forward and backward.
    """
    rows = interpolation_weights(x.shape[-2], size[0], x)
    cols = interpolation_weights(x.shape[-1], size[1], x)
    return left_matmul(rows, x) @ cols.t()


def separable_tokens(x: Tensor, hw_shape: Sequence[int], size: Sequence[int],
                     matrix: Callable[[Size, Size], Tensor]) -> Tensor:
    """A separable resampling of ``(B, H*W, C)`` tokens laid out as
    ``hw_shape`` to ``size``, returned as ``(B, h*w, C)`` tokens: the 1-D
    weights ``matrix(size_in, size_out)`` applied along the width, then the
    height, as two small matrix products on the tokens as they are (a
    strided view of a fused projection too).

    PyTorch's pooling and interpolation kernels take an NCHW map: the
    channels-last map of the tokens would be copied to NCHW and the result
    copied back, full-size copies that cost several times the resampling
    at high resolution.
    """
    batch, _, channels = x.shape
    (height, width), (out_h, out_w) = hw_shape, size
    weights_h = weights_like(matrix, height, out_h, like=x)
    weights_w = weights_like(matrix, width, out_w, like=x)
    rows = left_matmul(weights_w, x.reshape(batch * height, width, channels))
    out = left_matmul(weights_h, rows.reshape(batch, height, out_w * channels))
    return out.reshape(batch, out_h * out_w, channels)


def pool_tokens(x: Tensor, hw_shape: Sequence[int],
                size: Sequence[int]) -> Tensor:
    """``F.adaptive_avg_pool2d`` of ``(B, H*W, C)`` tokens laid out as
    ``hw_shape`` to ``size`` (:func:`separable_tokens`)."""
    return separable_tokens(x, hw_shape, size, pooling_matrix)


def resize_tokens(x: Tensor, hw_shape: Sequence[int],
                  size: Sequence[int]) -> Tensor:
    """:func:`resize` of ``(B, H*W, C)`` tokens laid out as ``hw_shape`` to
    ``size`` (:func:`separable_tokens`)."""
    return separable_tokens(x, hw_shape, size, interpolation_matrix)


def on_agent_grid(source: Tensor, agent_shape: Tuple[int, int]) -> Tensor:
    """Resize a source's per-token ``p×p`` agent maps to the agent grid.

    Args:
        source: ``(heads, p*p, h, w)``.
        agent_shape: Agent grid ``(a_h, a_w)``.

    Returns:
        ``(heads, h, w, a_h*a_w)``: :func:`to_agent_grid` (resized by
        matrix products) with the token axis unflattened.
    """
    return to_agent_grid(source, agent_shape,
                         resize_by_matmul).unflatten(1, source.shape[2:])


def separable_bias(full: Tensor,
                   rows: Tensor,
                   cols: Tensor,
                   hw_shape: Tuple[int, int],
                   agent_shape: Tuple[int, int],
                   token_major: bool,
                   out: Optional[Tensor] = None,
                   agent_count: Optional[int] = None,
                   differentiable: bool = True) -> Tensor:
    """One bias of agent attention, ``to_agent_grid(resize(full + rows +
    cols, hw_shape), agent_shape)``, built by matrix products whose operands
    are small beside the large map they write.

    The agent-grid resize acts on the sources' agent axis and the token-grid
    resize on their spatial axes, so the agents are mapped first, on the
    small sources. Bilinear resizing is separable: with ``R`` the 1-D
    weights to the token grid, ``full`` maps to ``R_h F R_wᵀ`` per agent,
    ``rows`` to ``R_h a`` (constant along the width) and ``cols`` to ``b
    R_wᵀ`` (constant along the height). The layouts take the terms as
    :func:`_agent_major_bias` and :func:`_token_major_bias` say. A small
    map is one dense product instead (:func:`_dense_bias`, where
    :func:`builds_by_product`): a few operations, forward and backward,
    where the separable build's hundred small ones cost more than the
    arithmetic.

    Args:
        full: ``(heads, p*p, f_h, f_w)`` source (7×7 in the models).
        rows: ``(heads, p*p, r_h, 1)`` source.
        cols: ``(heads, p*p, 1, r_w)`` source.
        hw_shape: Token grid ``(H, W)``.
        agent_shape: Agent grid ``(a_h, a_w)``.
        token_major: Return ``(heads, N, n)`` instead of ``(heads, n, N)``.
        out: Where to write the map, a contiguous tensor of its shape and
            of the dtype to compute it in (autograd does not go through
            it); None for a new tensor.
        agent_count: Agents of the map, at least the agent grid's; those
            beyond it are padded agents, whose bias is
            :data:`~.padded_agents.PADDED_AGENT_BIAS` at every token. None
            for the agent grid's.
        differentiable: False for a map of inference that autograd neither
            records nor rebuilds in a backward pass: a token-major map
            computed in 32 or 64 bits is then written by
            :func:`_token_major_by_rows` (the same values to the rounding
            of the precision).

    Returns:
        A contiguous map: the attention kernels read it row by row.
    """
    dtype = compute_dtype(full) if out is None else out.dtype
    # whatever the grad mode: shared_bias_attention builds a map without
    # autograd in forward and again with it in backward, the same way
    trained = any(source.requires_grad for source in (full, rows, cols))
    agent_count = agent_count or math.prod(agent_shape)
    if builds_by_product(full.shape[0], agent_count, math.prod(hw_shape),
                         _inner_size(full, rows, cols), dtype, trained):
        return _dense_bias(full, rows, cols, hw_shape, agent_shape,
                           token_major, out, agent_count)
    # padded agents: a constant full map and zero rows and columns give a
    # constant bias, as every resize's weights sum to 1
    full, rows, cols = (pad_agents(
        on_agent_grid(source, agent_shape), agent_count, dim=-1, value=pad)
                        for source, pad in zip((full, rows, cols),
                                               (PADDED_AGENT_BIAS, 0., 0.)))
    # (heads, f_h, f_w, n), (heads, r_h, n), (heads, r_w, n)
    rows, cols = rows[:, :, 0], cols[:, 0]
    if not token_major:
        return _agent_major_bias(full, rows, cols, *hw_shape, out)
    records = torch.is_grad_enabled() and trained
    if differentiable or records or dtype.itemsize < 4 or tracing():
        return _token_major_bias(full, rows, cols, *hw_shape, dtype, out)
    return _token_major_by_rows(full, rows, cols, *hw_shape, dtype, out)


def _agent_major_bias(full: Tensor, rows: Tensor, cols: Tensor, height: int,
                      width: int, out: Optional[Tensor]) -> Tensor:
    """The agent-major ``(heads, n, H*W)`` map of :func:`separable_bias`
    from the sources on the agent grid: ``full`` ``(heads, f_h, f_w, n)``,
    ``rows`` ``(heads, r_h, n)``, ``cols`` ``(heads, r_w, n)``.

    Each agent's ``H×W`` map is one product with inner size ``f_w + 2``:
    ``[R_h F | R_h a | 1]`` times ``[R_w | 1 | R_w b]ᵀ``, a batched
    product over heads and agents.
    """
    heads, full_h, full_w, agents = full.shape
    weights_w = interpolation_weights(full_w, width, full).t()
    one = full.new_ones(())
    left = torch.cat([
        torch.einsum('yi,eija->eayj',
                     interpolation_weights(full_h, height, full), full),
        torch.einsum('yi,eia->eay',
                     interpolation_weights(rows.shape[1], height, full),
                     rows).unsqueeze(-1),
        one.expand(heads, agents, height, 1)
    ], -1)
    right = torch.cat([
        weights_w.expand(heads, agents, full_w, width),
        one.expand(heads, agents, 1, width),
        torch.einsum('xj,eja->eax',
                     interpolation_weights(cols.shape[1], width, full),
                     cols).unsqueeze(2)
    ], 2)
    return batched_matmul(left, right, out).reshape(heads, agents,
                                                    height * width)


def _token_major_bias(full: Tensor, rows: Tensor, cols: Tensor, height: int,
                      width: int, dtype: torch.dtype,
                      out: Optional[Tensor]) -> Tensor:
    """The token-major ``(heads, H*W, n)`` map of :func:`separable_bias`,
    from the sources as :func:`_agent_major_bias` takes them; ``dtype`` is
    the one its products compute in (the running autocast's, or ``out``'s).

    Per head, the map is the product of ``[R_h | R_h' | 1]`` and ``[F R_wᵀ;
    a; b R_wᵀ]`` (laid out ``(x, agent)``; ``a`` repeated along the width).
    With 32- or 64-bit products the row term, constant along the width, is
    instead added to the map in place: its ``r_h`` inner rows would cost
    more than a pass over the map, while 16-bit products (or any under
    autocast) are cheap beside the memory they write.
    """
    heads, full_h, _, agents = full.shape
    fold_rows = dtype.itemsize < 4
    right = list(_along_width(full, cols, width))
    left = [
        interpolation_weights(full_h, height, full),
        full.new_ones(height, 1)
    ]
    if fold_rows:
        right.append(rows.unsqueeze(2).expand(-1, -1, width, -1))
        left.append(interpolation_weights(rows.shape[1], height, full))
    bias = left_matmul(torch.cat(left, 1), torch.cat(right, 1).flatten(2), out)
    if not fold_rows:
        bias.view(heads, height, width, agents).add_(
            _along_height(rows, height).unsqueeze(2))
    return bias.reshape(heads, height * width, agents)


def _along_width(full: Tensor, cols: Tensor,
                 width: int) -> Tuple[Tensor, Tensor]:
    """The full source ``(heads, f_h, f_w, n)`` and the column source
    ``(heads, r_w, n)`` resized to the token grid's ``width``: ``(heads,
    f_h, W, n)`` and ``(heads, 1, W, n)``."""
    full_w = full.shape[2]
    return (torch.einsum('xj,eija->eixa',
                         interpolation_weights(full_w, width, full), full),
            torch.einsum('xj,eja->exa',
                         interpolation_weights(cols.shape[1], width, full),
                         cols).unsqueeze(1))


def _along_height(rows: Tensor, height: int) -> Tensor:
    """The row source ``(heads, r_h, n)`` resized to the token grid's
    ``height``: ``(heads, H, n)``."""
    return torch.einsum('yi,eia->eya',
                        interpolation_weights(rows.shape[1], height, rows),
                        rows)


def _token_major_by_rows(full: Tensor, rows: Tensor, cols: Tensor,
                         height: int, width: int, dtype: torch.dtype,
                         out: Optional[Tensor]) -> Tensor:
    """The map of :func:`_token_major_bias` without autograd, in ``dtype``
    (32 or 64 bits), written one run of token rows at a time
    (:func:`resize_rows_into`): the full source resized along the width,
    with the column term added to each of its ``f_h`` rows (the resizing
    weights of a token row sum to 1), resized along the height, plus the
    row term. All maps of an uncached Agent-PVT-T or Agent-Swin-T forward
    at 800×1216 to 1024² (float32) took 0.77-0.90 of the products' time
    built this way, 1.4-4.5 % of the forward saved
    (``tools/analysis_tools/benchmark_bias_maps.py``, docs/benchmark)."""
    heads, _, _, agents = full.shape
    full_term, col_term = _along_width(full, cols, width)
    bias = (full.new_empty(heads, height * width, agents, dtype=dtype)
            if out is None else out)
    resize_rows_into(
        bias.view(heads, height, width, agents),
        full_term.add_(col_term).to(dtype),
        _along_height(rows, height).to(dtype).unsqueeze(2))
    return bias


def _inner_size(full: Tensor, rows: Tensor, cols: Tensor) -> int:
    """``f_h*f_w + r_h + r_w``: the values per agent of the three sources,
    the inner size of :func:`_dense_bias`'s product."""
    return full.shape[2] * full.shape[3] + rows.shape[2] + cols.shape[3]


def builds_by_product(heads: int, agents: int, tokens: int, inner: int,
                      dtype: torch.dtype, trained: bool) -> bool:
    """Whether :func:`separable_bias` builds a ``heads × agents × tokens``
    map by :func:`_dense_bias`: when its token-grid matrix (``tokens ×
    inner``) has at most :data:`DENSE_MAX_GRID_MATRIX` elements and either
    the map's sources are ``trained`` and it is built in 16-bit products,
    or the product has at most :data:`DENSE_MAX_MACS` multiply-adds
    (counted in 32-bit products: a 16-bit one counts half)."""
    if tokens * inner > DENSE_MAX_GRID_MATRIX:
        return False
    if trained and dtype.itemsize < 4:
        return True
    macs_in_32_bits = heads * agents * tokens * inner * dtype.itemsize // 4
    return macs_in_32_bits <= DENSE_MAX_MACS


def _dense_bias(full: Tensor, rows: Tensor, cols: Tensor,
                hw_shape: Tuple[int, int], agent_shape: Tuple[int, int],
                token_major: bool, out: Optional[Tensor],
                agent_count: int) -> Tensor:
    """The map of :func:`separable_bias` as one dense product per head,
    ``A S Tᵀ``: ``S`` holds each bias agent's source values ``(p*p, k)``,
    ``A`` resizes the agents to the agent grid (:func:`agent_grid_matrix`)
    and ``T`` reads the sources at each token (:func:`token_grid_matrix`);
    the rows of ``A S`` beyond the grid's agents, up to ``agent_count``,
    are padded agents (the full map's values at
    :data:`~.padded_agents.PADDED_AGENT_BIAS`, whose token weights sum to
    1). The ``k = f_h*f_w + r_h + r_w`` inner size (about 100-200) makes
    the product slower than the separable build for large maps."""
    heads, agent_num, full_h, full_w = full.shape
    sources = torch.cat([x.flatten(2) for x in (full, rows, cols)], 2)
    agents = weights_like(
        agent_grid_matrix, math.isqrt(agent_num), *agent_shape, like=full)
    per_agent = left_matmul(agents, sources)
    extra = agent_count - len(agents)
    if extra:
        padded = per_agent.new_zeros(per_agent.shape[2])
        padded[:full_h * full_w] = PADDED_AGENT_BIAS
        per_agent = torch.cat([per_agent, padded.expand(heads, extra, -1)], 1)
    tokens = weights_like(
        token_grid_matrix,
        full_h,
        full_w,
        rows.shape[2],
        cols.shape[3],
        *hw_shape,
        like=full)
    if token_major:
        return left_matmul(tokens, per_agent.transpose(1, 2), out)
    return batched_matmul(per_agent, tokens.t().expand(heads, -1, -1), out)
