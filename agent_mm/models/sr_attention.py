"""PVT's spatial-reduction attention as a token mixer ``forward(x,
hw_shape)``."""
from typing import Optional, Tuple

import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from .checks import check_num_heads, check_qk_scale, check_tokens
from .layers import (ChannelsLastConv2d, build_norm, map_to_tokens,
                     merge_heads, split_heads, tokens_to_map)
from .transformer import LAYER_NORM


class SpatialReductionAttention(BaseModule):
    """PVT attention whose keys/values come from a map shrunk by
    ``sr_ratio`` (a strided convolution, then a norm).

    Args:
        embed_dims: Channels ``C``.
        num_heads: Number of heads.
        sr_ratio: Stride of the reduction; 1 keeps keys at full resolution.
        qkv_bias: Bias in the q/kv projections.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        qk_scale: Factor of the dot products; ``None`` for
            ``head_dims ** -0.5``.
        norm_cfg: The norm after the reduction (mmcv config).
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 sr_ratio: int,
                 qkv_bias: bool = True,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 qk_scale: Optional[float] = None,
                 norm_cfg: dict = LAYER_NORM):
        super().__init__()
        owner = type(self).__name__
        check_num_heads(owner, 'num_heads', num_heads, embed_dims)
        check_qk_scale(owner, qk_scale)
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.qk_scale = qk_scale
        self.attn_drop_rate = attn_drop
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(embed_dims, embed_dims, bias=qkv_bias)
        self.kv = nn.Linear(embed_dims, embed_dims * 2, bias=qkv_bias)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = ChannelsLastConv2d(
                embed_dims, embed_dims, sr_ratio, stride=sr_ratio)
            self.norm = build_norm(norm_cfg, embed_dims)

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        """Attend over ``x`` of shape ``(B, H*W, C)`` laid out as
        ``hw_shape``."""
        check_tokens(type(self).__name__, x, hw_shape, self.embed_dims)
        source = x
        if self.sr_ratio > 1:
            source = tokens_to_map(x, hw_shape)
            source = self.norm(map_to_tokens(self.sr(source)))
        query, key, value = (
            split_heads(t, self.num_heads)
            for t in (self.q(x), *self.kv(source).chunk(2, dim=-1)))
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            dropout_p=self.attn_drop_rate if self.training else 0.,
            scale=self.qk_scale)
        return self.proj_drop(self.proj(merge_heads(out)))
