"""Agent attention (Han et al., "Agent Attention", ECCV 2024).

A small grid of agent tokens, pooled from the queries, first gathers from all
keys/values with softmax attention, then every query reads from the agents.
Both attentions carry learned position biases that are interpolated to the
current token grid, so the module works at any input resolution.
"""
import functools
import math
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmengine.registry import MODELS
from torch import Tensor

from .biased_attention import recomputed_bias_attention
from .layers import (ChannelsLastConv2d, check_agent_num, check_agent_shape,
                     check_int_pair, check_int_range, check_num_heads,
                     check_probability, map_to_tokens, residual_sum,
                     tokens_to_map)

ATTN_IMPLS = ('fast', 'reference')
BIAS_CACHE_SIZE = 2
BIAS_NAMES = ('an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')


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
def _interpolation_matrix(size_in: int, size_out: int) -> Tensor:
    """``(size_out, size_in)`` weights of 1-D linear resizing
    (``align_corners=False``), the per-axis factor of bilinear resizing."""
    basis = torch.eye(size_in, dtype=torch.float64).unsqueeze(0)
    weights = F.interpolate(
        basis, size=size_out, mode='linear', align_corners=False)
    return weights[0].t().float()


def _resize_matrices(in_hw: Sequence[int], size: Sequence[int],
                     like: Tensor) -> Tuple[Tensor, Tensor]:
    """Row ``(H, h)`` and column ``(W, w)`` weights of bilinear resizing
    from ``in_hw`` to ``size``, on ``like``'s device and dtype."""
    return (_interpolation_matrix(in_hw[0], size[0]).to(like),
            _interpolation_matrix(in_hw[1], size[1]).to(like))


@functools.lru_cache(maxsize=128)
def _pooling_matrix(size_in: int, size_out: int) -> Tensor:
    """``(size_out, size_in)`` weights of 1-D adaptive average pooling: bin
    ``i`` averages ``[floor(i*in/out), ceil((i+1)*in/out))``."""
    weights = torch.zeros(size_out, size_in)
    for i in range(size_out):
        start = i * size_in // size_out
        end = -(-(i + 1) * size_in // size_out)
        weights[i, start:end] = 1 / (end - start)
    return weights


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
    rows, cols = _resize_matrices(x.shape[-2:], size, x)
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
    pool_h = _pooling_matrix(height, out_h).to(x)
    pool_w = _pooling_matrix(width, out_w).to(x)
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
    rows, cols = _resize_matrices((height, width), size, source)
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


@MODELS.register_module()
class AgentAttention(BaseModule):
    """Global agent attention over a ``H×W`` token map.

    Args:
        embed_dims: Channels ``C``.
        num_heads: Number of heads; ``C`` must be divisible by it.
        ref_size: Token grid ``(r_h, r_w)`` of a 224×224 image at this stage
            (shape of the ``ah/aw/ha/wa`` biases).
        agent_num: Number of learned bias agents, a square ``p*p``.
        agent_shape: Agent grid ``(a_h, a_w)`` used downstream.
        qkv_bias: Whether the projections have a bias.
        fused_qkv: One ``qkv`` projection (Swin layout) instead of ``q`` and
            ``kv`` (PVT layout).
        attn_drop: Dropout on both attention maps.
        proj_drop: Dropout after ``proj``.
        attn_impl: ``'fast'`` (biases computed once and broadcast over the
            batch, fused attention kernels, neither biases nor attention
            maps stored for backward, bias cache in eval) or
            ``'reference'`` (the equations computed literally, as the
            authors do; for debugging and benchmarks).
        bias_cache_size: Number of input shapes whose bias maps the fast
            path keeps in eval mode (the most recently used); 0 turns the
            cache off. Each shape costs ``2 * heads * n * H * W`` floats.
        init_cfg: mmengine initialisation config.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 ref_size: Tuple[int, int],
                 agent_num: int = 49,
                 agent_shape: Tuple[int, int] = (7, 7),
                 qkv_bias: bool = True,
                 fused_qkv: bool = False,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 attn_impl: str = 'fast',
                 bias_cache_size: int = BIAS_CACHE_SIZE,
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        self._check_settings(embed_dims, num_heads, ref_size, agent_num,
                             agent_shape, attn_drop, proj_drop,
                             bias_cache_size)
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, '
                             f'got {attn_impl!r}.')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        self.scale = self.head_dims**-0.5
        self.agent_num = agent_num
        self.agent_shape = tuple(agent_shape)
        self.fused_qkv = fused_qkv
        self.attn_impl = attn_impl
        self.bias_cache_size = bias_cache_size
        self.attn_drop_rate = attn_drop

        if fused_qkv:
            self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        else:
            self.q = nn.Linear(embed_dims, embed_dims, bias=qkv_bias)
            self.kv = nn.Linear(embed_dims, embed_dims * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = ChannelsLastConv2d(
            embed_dims, embed_dims, 3, padding=1, groups=embed_dims)

        ref_h, ref_w = ref_size
        self.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.ah_bias = nn.Parameter(
            torch.zeros(1, num_heads, agent_num, ref_h, 1))
        self.aw_bias = nn.Parameter(
            torch.zeros(1, num_heads, agent_num, 1, ref_w))
        self.ha_bias = nn.Parameter(
            torch.zeros(1, num_heads, ref_h, 1, agent_num))
        self.wa_bias = nn.Parameter(
            torch.zeros(1, num_heads, 1, ref_w, agent_num))
        for name in BIAS_NAMES:
            trunc_normal_(getattr(self, name), std=.02)
        self._bias_cache: 'OrderedDict[tuple, Tuple[Tensor, Tensor]]' = (
            OrderedDict())

    @staticmethod
    def _check_settings(embed_dims: int, num_heads: int,
                        ref_size: Tuple[int, int], agent_num: int,
                        agent_shape: Tuple[int, int], attn_drop: float,
                        proj_drop: float, bias_cache_size: int) -> None:
        """Raise a ``ValueError`` naming the first invalid argument."""
        name = 'AgentAttention'
        check_int_range(
            name,
            'embed_dims',
            embed_dims,
            1,
            fix='Give the channels C of the tokens.')
        check_num_heads(name, 'num_heads', num_heads, embed_dims)
        check_int_pair(name, 'ref_size', ref_size,
                       'Give the token grid (r_h, r_w) of a 224x224 image.')
        check_agent_num(name, 'agent_num', agent_num)
        check_agent_shape(name, 'agent_shape', agent_shape)
        check_probability(name, 'attn_drop', attn_drop,
                          '0 turns attention dropout off.')
        check_probability(name, 'proj_drop', proj_drop,
                          '0 turns projection dropout off.')
        check_int_range(
            name,
            'bias_cache_size',
            bias_cache_size,
            0,
            fix='0 turns the eval bias cache off.')

    # ------------------------------------------------------------------
    # position biases
    def _bias_sources(self) -> Tuple[Tuple[Tensor, Tensor], Tuple[Tensor,
                                                                  Tensor]]:
        """The two source maps of each bias, as ``(heads, p*p, h, w)``."""
        agent_to_token = (self.an_bias,
                          (self.ah_bias + self.aw_bias).squeeze(0))
        token_to_agent = (self.na_bias, (self.ha_bias + self.wa_bias).squeeze(
            0).permute(0, 3, 1, 2))
        return agent_to_token, token_to_agent

    def _separable_sources(self) -> Tuple[Tuple[Tensor, ...], Tuple[
            Tensor, ...]]:
        """The sources of :meth:`_bias_sources` with each broadcast sum
        left unsummed: ``(heads, p*p, h, w)`` maps, some 1 wide or high."""
        agent_to_token = (self.an_bias, self.ah_bias.squeeze(0),
                          self.aw_bias.squeeze(0))
        token_to_agent = (self.na_bias,
                          self.ha_bias.squeeze(0).permute(0, 3, 1, 2),
                          self.wa_bias.squeeze(0).permute(0, 3, 1, 2))
        return agent_to_token, token_to_agent

    def _bias_builder(self, hw_shape: Tuple[int, int],
                      token_major: bool) -> Callable[..., Tensor]:
        """:func:`separable_bias` for this module and token grid."""
        return functools.partial(
            separable_bias,
            hw_shape=tuple(hw_shape),
            agent_shape=self.agent_shape,
            token_major=token_major)

    def _compute_biases(self, hw_shape: Tuple[int, int]) -> Tuple[Tensor,
                                                                  Tensor]:
        """Agent→token bias ``(heads, n, N)`` and token→agent ``(heads, N,
        n)``, the reference's maps computed in the cheap order (see
        :func:`mapped_source`)."""
        agent_to_token, token_to_agent = self._separable_sources()
        agent_bias = self._bias_builder(hw_shape, False)(*agent_to_token)
        token_bias = self._bias_builder(hw_shape, True)(*token_to_agent)
        return agent_bias, token_bias

    def _reference_biases(self, hw_shape: Tuple[int, int],
                          batch: int) -> Tuple[Tensor, Tensor]:
        """The biases as the authors compute them: sources expanded to every
        image of the batch, every term mapped separately, in the spec's
        order. Returns ``(B, heads, n, N)`` and ``(B, heads, N, n)``."""

        def per_image(sources: Tuple[Tensor, Tensor]) -> Tensor:
            return sum(
                to_agent_grid(
                    resize(src.repeat(batch, 1, 1, 1), hw_shape),
                    self.agent_shape) for src in sources)

        agent_to_token, token_to_agent = self._bias_sources()
        agent_bias = per_image(agent_to_token).transpose(1, 2)
        token_bias = per_image(token_to_agent)
        return (agent_bias.unflatten(0, (batch, self.num_heads)),
                token_bias.unflatten(0, (batch, self.num_heads)))

    def _cache_key(self, hw_shape: Tuple[int, int]) -> tuple:
        params = [getattr(self, name) for name in BIAS_NAMES]
        return (tuple(hw_shape), params[0].device, params[0].dtype,
                tuple((p.data_ptr(), p._version) for p in params))

    def _cached_biases(
            self, hw_shape: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        """Biases, memoised per input shape while the module is frozen.

        The cache is used only in eval mode when no gradient can flow to the
        biases; it is keyed by the biases' storage and version counters, so
        any in-place update (optimizer step, ``load_state_dict``) misses it.
        It keeps only the ``bias_cache_size`` most recently used shapes:
        the maps are large (``heads * n * H * W`` floats each, 615 MB for all
        of Agent-PVT-T's blocks at 1024²) and keep-ratio test pipelines
        produce many shapes.
        """
        needs_grad = torch.is_grad_enabled() and self.an_bias.requires_grad
        if self.training or needs_grad or not self.bias_cache_size:
            return self._compute_biases(hw_shape)
        key = self._cache_key(hw_shape)
        if key in self._bias_cache:
            self._bias_cache.move_to_end(key)
            return self._bias_cache[key]
        stale = [k for k in self._bias_cache if k[1:] != key[1:]]
        for k in stale:
            del self._bias_cache[k]
        while len(self._bias_cache) >= self.bias_cache_size:
            self._bias_cache.popitem(last=False)
        self._bias_cache[key] = self._compute_biases(hw_shape)
        return self._bias_cache[key]

    def train(self, mode: bool = True) -> 'AgentAttention':
        self._bias_cache.clear()
        return super().train(mode)

    # ------------------------------------------------------------------
    # forward
    def _project(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if self.fused_qkv:
            return self.qkv(x).chunk(3, dim=-1)
        return (self.q(x), *self.kv(x).chunk(2, dim=-1))

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        return x.reshape(batch, tokens, self.num_heads,
                         self.head_dims).transpose(1, 2)

    def _literal_attention(self, query: Tensor, key: Tensor, value: Tensor,
                           bias: Tensor) -> Tensor:
        """``softmax(scale * q kᵀ + bias) v`` with dropout on the weights,
        computed as written."""
        weights = (query * self.scale) @ key.transpose(-2, -1) + bias
        weights = self.attn_drop(weights.softmax(dim=-1))
        return weights @ value

    def _fused_attention(self, query: Tensor, key: Tensor, value: Tensor,
                         bias: Tensor, dropout: float) -> Tensor:
        """The same through ``scaled_dot_product_attention``. A 4-D dense
        mask lets CPU inference use the fused (flash) kernel; a 3-D one
        falls back to the unfused math path."""
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=bias.to(query.dtype).unsqueeze(0),
            dropout_p=dropout,
            scale=self.scale)

    def _fast_attention(self, query: Tensor, key: Tensor, value: Tensor,
                        agents: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        """Both attentions of the fast path, ``(B, heads, N, d)``."""
        dropout = self.attn_drop_rate if self.training else 0.
        trains = torch.is_grad_enabled() and (query.requires_grad
                                              or self.an_bias.requires_grad)
        if trains and not dropout:
            # fused kernels give no gradient for a mask: keep only the small
            # bias sources and rebuild biases and weights in backward
            agent_to_token, token_to_agent = self._separable_sources()
            agent_value = recomputed_bias_attention(
                agents, key, value, self.scale,
                self._bias_builder(hw_shape, False), *agent_to_token)
            return recomputed_bias_attention(
                query, agents, agent_value, self.scale,
                self._bias_builder(hw_shape, True), *token_to_agent)
        agent_bias, token_bias = self._cached_biases(hw_shape)
        agent_value = self._fused_attention(agents, key, value, agent_bias,
                                            dropout)
        return self._fused_attention(query, agents, agent_value, token_bias,
                                     dropout)

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        """Attend over ``x`` of shape ``(B, H*W, C)`` laid out as
        ``hw_shape``."""
        batch, tokens, channels = x.shape
        height, width = hw_shape
        if tokens != height * width:
            raise ValueError(f'x has {tokens} tokens but hw_shape is '
                             f'{tuple(hw_shape)} ({height * width} tokens).')
        query, key, value = self._project(x)
        agents = pool_tokens(query, hw_shape, self.agent_shape)

        query, key, value_heads, agents = map(self._split_heads,
                                              (query, key, value, agents))
        # an empty batch takes the literal path: the fast path's backward
        # needs an image, and the literal one gives every bias a zero
        # gradient, as a convolution gives its weight
        if self.attn_impl == 'fast' and batch:
            out = self._fast_attention(query, key, value_heads, agents,
                                       hw_shape)
        else:
            agent_bias, token_bias = self._reference_biases(hw_shape, batch)
            agent_value = self._literal_attention(agents, key, value_heads,
                                                  agent_bias)
            out = self._literal_attention(query, agents, agent_value,
                                          token_bias)

        out = out.transpose(1, 2).reshape(batch, tokens, channels)
        out = residual_sum(
            out, map_to_tokens(self.dwc(tokens_to_map(value, hw_shape))))
        return self.proj_drop(self.proj(out))
