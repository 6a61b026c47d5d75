"""What the agent backbones share: the pre-norm block around any token
mixer, the patch embedding, learned position embeddings, and the stage
constants."""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from torch import Tensor

from .bias_maps import resize, resize_tokens
from .layers import (ChannelsLastConv2d, Mlp, build_norm,
                     drop_path_or_identity, map_to_tokens, maybe_checkpoint,
                     mlp_residual, residual_sum, tokens_to_map)
from .tracing import exporting

NUM_STAGES = 4
# Side of the images the released models were pre-trained on; the position
# embeddings and biases are sized for its token grids.
PRETRAIN_IMG_SIZE = 224
# Downsampling of each stage's patch embedding (or merging), as released:
# strides 4, 8, 16, 32.
PATCH_SIZES = (4, 2, 2, 2)
# The norm of the blocks and patch embeddings unless a backbone says
# otherwise (mmcv config).
LAYER_NORM = dict(type='LN')


def optional_norm(norm_cfg: Optional[dict], dims: int) -> nn.Module:
    """:func:`build_norm`, or identity when ``norm_cfg`` is None."""
    return nn.Identity() if norm_cfg is None else build_norm(norm_cfg, dims)


class TransformerBlock(BaseModule):
    """Pre-norm transformer block around a token mixer:
    ``x + drop_path(attn(norm1(x), hw_shape))``, then
    ``x + drop_path(mlp(norm2(x)))``.

    Args:
        embed_dims: Channels ``C``.
        attn: The token mixer, ``forward(x, hw_shape)`` on ``(B, H*W, C)``.
        mlp_ratio: Hidden channels of the MLP over ``C``.
        drop_rate: Dropout in the MLP.
        drop_path_rate: Stochastic depth of both residual branches.
        with_cp: Gradient checkpointing of the whole block.
        norm_cfg: Both norms (mmcv config).
        act_cfg: The MLP's activation (mmcv config).
    """

    def __init__(self,
                 embed_dims: int,
                 attn: nn.Module,
                 mlp_ratio: float,
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 with_cp: bool = False,
                 norm_cfg: Optional[dict] = None,
                 act_cfg: Optional[dict] = None):
        super().__init__()
        norm_cfg = norm_cfg or LAYER_NORM
        self.norm1 = build_norm(norm_cfg, embed_dims)
        self.attn = attn
        self.drop_path = drop_path_or_identity(drop_path_rate)
        self.norm2 = build_norm(norm_cfg, embed_dims)
        self.mlp = Mlp(embed_dims, int(embed_dims * mlp_ratio), drop_rate,
                       act_cfg)
        self.with_cp = with_cp

    def _forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        branch = self.drop_path(self.attn(self.norm1(x), hw_shape))
        x = residual_sum(branch, x, self.attn, self.drop_path)
        return mlp_residual(x, self.norm2, self.mlp, self.drop_path,
                            self.training)

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        return maybe_checkpoint(
            self._forward, x, hw_shape, enabled=self.with_cp)


class PatchEmbed(BaseModule):
    """Non-overlapping ``patch_size``² patches, then a norm; returns tokens
    and their grid.

    Args:
        in_channels: Input channels.
        embed_dims: Output channels.
        patch_size: Side (and stride) of the patches.
        pad: Zero-pad right/bottom to whole patches (Swin) instead of
            dropping the remainder (PVT).
        norm_cfg: The norm after the projection (mmcv config); None for no
            norm, as in mmcv's ``PatchEmbed``.
    """

    def __init__(self,
                 in_channels: int,
                 embed_dims: int,
                 patch_size: int,
                 pad: bool = False,
                 norm_cfg: Optional[dict] = LAYER_NORM):
        super().__init__()
        self.patch_size = patch_size
        self.pad = pad
        self.proj = ChannelsLastConv2d(
            in_channels, embed_dims, patch_size, stride=patch_size)
        self.norm = optional_norm(norm_cfg, embed_dims)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        if self.pad:
            height, width = x.shape[-2:]
            x = F.pad(
                x, (0, -width % self.patch_size, 0, -height % self.patch_size))
        x = self.proj(x)
        hw_shape = tuple(x.shape[-2:])
        return self.norm(map_to_tokens(x)), hw_shape


def pretrain_grid(
    stage: int,
    img_size: Tuple[int, int] = (PRETRAIN_IMG_SIZE, PRETRAIN_IMG_SIZE),
    patch_sizes: Sequence[int] = PATCH_SIZES
) -> Tuple[int, int]:
    """Token grid of stage ``stage`` for a pre-training image of
    ``img_size`` (by default 224×224 at strides 4, 8, 16, 32): the size of
    the position embeddings and biases learned on it.

    Args:
        stage: Stage index.
        img_size: ``(height, width)`` of the pre-training images.
        patch_sizes: Downsampling of each stage.
    """
    stride = math.prod(patch_sizes[:stage + 1])
    return img_size[0] // stride, img_size[1] // stride


def learned_pos_embed(grid: Tuple[int, int], dims: int) -> nn.Parameter:
    """A learned position embedding ``(1, h*w, dims)`` for the token grid
    ``(h, w)``, truncated normal (std 0.02)."""
    pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dims))
    trunc_normal_(pos_embed, std=.02)
    return pos_embed


def resized_pos_embed(pos_embed: Tensor, grid: Tuple[int, int],
                      hw_shape: Tuple[int, int]) -> Tensor:
    """A position embedding learned on ``grid``, bilinearly resized to the
    token grid ``hw_shape`` (as mmdet's PVT does), in the token layout; a
    graph traced for export takes the interpolation kernel (an ONNX
    ``Resize`` that follows dynamic sizes)."""
    if tuple(hw_shape) == tuple(grid):
        return pos_embed
    if exporting():
        return map_to_tokens(resize(tokens_to_map(pos_embed, grid), hw_shape))
    return resize_tokens(pos_embed, grid, hw_shape)
