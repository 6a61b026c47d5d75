"""Swin's (shifted) window attention as a token mixer ``forward(x,
hw_shape)``: padding, rolling and window partition happen inside."""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from torch import Tensor

from .checks import check_qk_scale, check_tokens
from .layers import biased_attention


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """``(B, H, W, C)`` → ``(B, nW, ws*ws, C)``; H, W multiples of ws."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // window_size, window_size,
                  width // window_size, window_size, channels)
    num_windows = (height // window_size) * (width // window_size)
    x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, num_windows, window_size * window_size, channels)


def window_reverse(windows: Tensor, window_size: int, height: int,
                   width: int) -> Tensor:
    """Inverse of :func:`window_partition`."""
    batch, channels = windows.shape[0], windows.shape[-1]
    x = windows.reshape(batch, height // window_size, width // window_size,
                        window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


def shift_region_mask(height: int, width: int, window_size: int, shift: int,
                      device: torch.device) -> Tensor:
    """``(nW, ws*ws, ws*ws)`` mask, −100 between tokens that came from
    different regions of the rolled (padded) map."""
    regions = torch.zeros(1, height, width, 1, device=device)
    bounds = (slice(0, -window_size), slice(-window_size,
                                            -shift), slice(-shift, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            regions[:, rows, cols, :] = label
            label += 1
    windows = window_partition(regions, window_size).squeeze(-1)[0]
    different = windows.unsqueeze(1) != windows.unsqueeze(2)
    return different.float() * -100.0


def relative_position_index(window_size: int) -> Tensor:
    """``(ws*ws, ws*ws)`` index into the relative position bias table."""
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(window_size),
            torch.arange(window_size),
            indexing='ij')).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]) + window_size - 1
    return relative[0] * (2 * window_size - 1) + relative[1]


class ShiftWindowAttention(BaseModule):
    """Multi-head self-attention within ``window_size``² windows, with a
    relative position bias, on a map rolled by ``shift`` (0: no shift).

    The map is zero-padded right/bottom to whole windows and cropped back
    afterwards, as in Swin.

    Args:
        embed_dims: Channels ``C``.
        num_heads: Number of heads.
        window_size: Side of the windows.
        shift: Roll of the map before partition (Swin: ``window_size // 2``
            in every second block).
        qkv_bias: Bias in the qkv projection.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        qk_scale: Factor of the dot products; ``None`` for
            ``head_dims ** -0.5``.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 window_size: int,
                 shift: int = 0,
                 qkv_bias: bool = True,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 qk_scale: Optional[float] = None):
        super().__init__()
        check_qk_scale(type(self).__name__, qk_scale)
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.qk_scale = qk_scale
        self.window_size = window_size
        self.shift = shift
        self.attn_drop_rate = attn_drop
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1)**2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=.02)
        self.register_buffer('relative_position_index',
                             relative_position_index(window_size))

    def position_bias(self) -> Tensor:
        """``(heads, ws*ws, ws*ws)`` relative position bias, row-major as
        the fused attention kernel reads it (a head-minor layout slows
        it)."""
        bias = self.relative_position_bias_table[
            self.relative_position_index.flatten()]
        tokens = self.window_size**2
        return bias.reshape(tokens, tokens, -1).permute(2, 0, 1).contiguous()

    def attend_windows(self, windows: Tensor,
                       mask: Optional[Tensor]) -> Tensor:
        """Attend within windows ``(B, nW, ws*ws, C)``; ``mask`` is
        ``(nW, ws*ws, ws*ws)`` or None."""
        batch, num_windows, tokens, channels = windows.shape
        qkv = self.qkv(windows).unflatten(-1, (3, self.num_heads, -1))
        # 4-D (B*nW, heads, N, d): SDPA's fused CPU kernels take 4-D inputs
        # only (5-D runs 3-4x slower)
        query, key, value = qkv.permute(3, 0, 1, 4, 2, 5).flatten(1, 2)
        bias = self.position_bias()
        if mask is not None:
            # (nW, heads, N, N) per image: a view for one, a copy beyond
            bias = (bias + mask.unsqueeze(1)).expand(batch, -1, -1, -1,
                                                     -1).flatten(0, 1)
        out = biased_attention(query, key, value, bias, self.qk_scale,
                               self.attn_drop_rate if self.training else 0.)
        out = out.transpose(1, 2).reshape(batch, num_windows, tokens, channels)
        return self.proj_drop(self.proj(out))

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        """Attend over ``x`` of shape ``(B, H*W, C)`` laid out as
        ``hw_shape``."""
        check_tokens(type(self).__name__, x, hw_shape, self.embed_dims)
        height, width = hw_shape
        size, shift = self.window_size, self.shift
        x = x.unflatten(1, hw_shape)
        x = F.pad(x, (0, 0, 0, -width % size, 0, -height % size))
        padded_h, padded_w = x.shape[1:3]
        mask = None
        if shift:
            x = torch.roll(x, (-shift, -shift), dims=(1, 2))
            mask = shift_region_mask(padded_h, padded_w, size, shift, x.device)
        windows = self.attend_windows(window_partition(x, size), mask)
        x = window_reverse(windows, size, padded_h, padded_w)
        if shift:
            x = torch.roll(x, (shift, shift), dims=(1, 2))
        return x[:, :height, :width].flatten(1, 2)
