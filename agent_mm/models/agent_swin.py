"""Agent-Swin: Swin Transformer whose stages mix agent attention ('A')
blocks with shifted-window attention ('B') blocks."""
import re
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmengine.registry import MODELS
from torch import Tensor

from .agent_attention import BIAS_CACHE_SIZE, AgentAttention
from .base import NUM_STAGES, AgentBackbone
from .layers import (ChannelsLastConv2d, Mlp, check_backbone_settings,
                     check_input, check_int_range, check_out_indices,
                     check_positive, check_stage_heads, check_stage_lists,
                     drop_path_or_identity, linear_drop_path_rates,
                     map_to_tokens, maybe_checkpoint, mlp_residual,
                     residual_sum, resolve_arch, tokens_to_map)

PATCH_SIZE = 4
MIN_INPUT_SIZE = 32
REF_GRID = 56  # token grid of stage 0 for a 224×224 image
STAGE_LISTS = ('depths', 'num_heads', 'agent_num', 'agent_shapes')


def parse_attn_type(attn_type: str, depths: Sequence[int]) -> List[str]:
    """Expand a stage code such as ``'AAMB2'`` to one letter per block.

    Each of the four letters is a stage: 'A' agent attention, 'B' shifted
    windows, 'M' mixed, whose first k blocks are 'A' and the rest 'B', with
    k the number ending the string.
    """
    match = re.fullmatch(r'([ABM]{4})(\d*)', attn_type or '')
    mixed_ok = match and (('M' in match[1]) == bool(match[2]))
    if not mixed_ok:
        raise ValueError(
            "AgentSwinTransformer attn_type must be 4 letters of 'A' (agent "
            "attention), 'B' (shifted windows) or 'M' (mixed), with the "
            "number of leading 'A' blocks of the 'M' stage at the end, e.g. "
            f"'AAAB' or 'AAMB2'; got {attn_type!r}.")
    num_agent = int(match[2]) if match[2] else 0
    stage_types = []
    for letter, depth in zip(match[1], depths):
        if letter == 'M':
            if num_agent > depth:
                raise ValueError(f'attn_type {attn_type!r} asks for '
                                 f'{num_agent} agent blocks in a stage of '
                                 f'{depth} blocks.')
            stage_types.append('A' * num_agent + 'B' * (depth - num_agent))
        else:
            stage_types.append(letter * depth)
    return stage_types


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
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width,
                                               channels)


def shift_region_mask(height: int, width: int, window_size: int, shift: int,
                      device: torch.device) -> Tensor:
    """``(nW, ws*ws, ws*ws)`` mask, −100 between tokens that came from
    different regions of the rolled (padded) map."""
    regions = torch.zeros(1, height, width, 1, device=device)
    bounds = (slice(0, -window_size), slice(-window_size, -shift),
              slice(-shift, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            regions[:, rows, cols, :] = label
            label += 1
    windows = window_partition(regions, window_size).squeeze(-1)[0]
    different = windows.unsqueeze(1) != windows.unsqueeze(2)
    return different.float() * -100.0


class WindowAttention(BaseModule):
    """Window multi-head self-attention with relative position bias."""

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 window_size: int,
                 qkv_bias: bool = True,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.attn_drop_rate = attn_drop
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1)**2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=.02)
        self.register_buffer('relative_position_index',
                             self._relative_position_index(window_size))

    @staticmethod
    def _relative_position_index(window_size: int) -> Tensor:
        coords = torch.stack(
            torch.meshgrid(
                torch.arange(window_size),
                torch.arange(window_size),
                indexing='ij')).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]) + window_size - 1
        return relative[0] * (2 * window_size - 1) + relative[1]

    def position_bias(self) -> Tensor:
        """``(heads, ws*ws, ws*ws)`` relative position bias."""
        bias = self.relative_position_bias_table[
            self.relative_position_index.flatten()]
        tokens = self.window_size**2
        return bias.reshape(tokens, tokens, -1).permute(2, 0, 1)

    def forward(self, windows: Tensor, mask: Optional[Tensor]) -> Tensor:
        """Attend within windows ``(B, nW, ws*ws, C)``; ``mask`` is
        ``(nW, ws*ws, ws*ws)`` or None."""
        batch, num_windows, tokens, channels = windows.shape
        qkv = self.qkv(windows).unflatten(-1, (3, self.num_heads, -1))
        query, key, value = qkv.permute(3, 0, 1, 4, 2, 5)
        bias = self.position_bias()
        if mask is not None:
            bias = bias + mask.unsqueeze(1)
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=bias.to(query.dtype),
            dropout_p=self.attn_drop_rate if self.training else 0.)
        out = out.transpose(2, 3).reshape(batch, num_windows, tokens,
                                          channels)
        return self.proj_drop(self.proj(out))


class AgentSwinBlock(BaseModule):
    """One block: agent attention over the whole map ('A') or (shifted)
    window attention ('B'), then the MLP; pre-norm residuals."""

    def __init__(self, embed_dims: int, attn: nn.Module, shift: int,
                 mlp_ratio: float, drop_rate: float, drop_path_rate: float,
                 with_cp: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dims)
        self.attn = attn
        self.shift = shift
        self.drop_path = drop_path_or_identity(drop_path_rate)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.mlp = Mlp(embed_dims, int(embed_dims * mlp_ratio), drop_rate)
        self.with_cp = with_cp

    def _window_attention(self, x: Tensor, hw_shape: Tuple[int,
                                                           int]) -> Tensor:
        height, width = hw_shape
        size = self.attn.window_size
        x = x.unflatten(1, hw_shape)
        x = F.pad(x, (0, 0, 0, -width % size, 0, -height % size))
        padded_h, padded_w = x.shape[1:3]
        mask = None
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), dims=(1, 2))
            mask = shift_region_mask(padded_h, padded_w, size, self.shift,
                                     x.device)
        windows = self.attn(window_partition(x, size), mask)
        x = window_reverse(windows, size, padded_h, padded_w)
        if self.shift:
            x = torch.roll(x, (self.shift, self.shift), dims=(1, 2))
        return x[:, :height, :width].flatten(1, 2)

    def _forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        shortcut, x = x, self.norm1(x)
        if isinstance(self.attn, AgentAttention):
            x = self.attn(x, hw_shape)
        else:
            x = self._window_attention(x, hw_shape)
        x = residual_sum(self.drop_path(x), shortcut)
        return mlp_residual(x, self.norm2, self.mlp, self.drop_path,
                            self.training)

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        return maybe_checkpoint(
            self._forward, x, hw_shape, enabled=self.with_cp)


class PatchMerging(BaseModule):
    """2×2 neighbourhood → one token: ``LayerNorm(4C)`` then
    ``Linear(4C, 2C)``; odd sides are padded bottom/right."""

    def __init__(self, embed_dims: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * embed_dims)
        self.reduction = nn.Linear(4 * embed_dims, 2 * embed_dims, bias=False)

    def forward(self, x: Tensor,
                hw_shape: Tuple[int, int]) -> Tuple[Tensor, Tuple[int, int]]:
        height, width = hw_shape
        x = x.unflatten(1, hw_shape)
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        phases = [x[:, r::2, c::2] for r, c in ((0, 0), (1, 0), (0, 1),
                                                (1, 1))]
        x = torch.cat(phases, dim=-1)
        out_shape = tuple(x.shape[1:3])
        x = self.reduction(self.norm(x.flatten(1, 2)))
        return x, out_shape


class AgentSwinStage(BaseModule):
    """The blocks of one stage and the patch merging that follows it."""

    def __init__(self, blocks: List[AgentSwinBlock],
                 downsample: Optional[PatchMerging]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        for block in self.blocks:
            x = block(x, hw_shape)
        return x


class SwinPatchEmbed(BaseModule):
    """Zero-pad right/bottom to a multiple of 4, 4×4 patches, LayerNorm."""

    def __init__(self, in_channels: int, embed_dims: int):
        super().__init__()
        self.proj = ChannelsLastConv2d(
            in_channels, embed_dims, PATCH_SIZE, stride=PATCH_SIZE)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        height, width = x.shape[-2:]
        x = F.pad(x, (0, -width % PATCH_SIZE, 0, -height % PATCH_SIZE))
        x = self.proj(x)
        hw_shape = tuple(x.shape[-2:])
        return self.norm(map_to_tokens(x)), hw_shape


@MODELS.register_module()
class AgentSwinTransformer(AgentBackbone):
    """Agent-Swin backbone (Han et al., "Agent Attention", ECCV 2024).

    Parameter names follow the authors' release. Outputs, for each index in
    ``out_indices``, the stage's features before merging, through
    ``norm{i}``, as ``(B, C·2^i, H_i, W_i)`` at strides 4, 8, 16, 32.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` or a dict with every key
            of :attr:`arch_zoo` entries.
        in_channels: Image channels.
        embed_dims: Channels of stage 0 (doubling at each stage).
        depths, num_heads, agent_num, agent_shapes: Per-stage overrides.
        attn_type: Stage code, see :func:`parse_attn_type`.
        window_size: Window of the 'B' blocks.
        mlp_ratio: MLP hidden ratio.
        qkv_bias: Bias in the qkv projections.
        drop_rate: Dropout in the MLPs and after projections.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth, rising linearly to this value.
        out_indices: Stages whose outputs are returned.
        frozen_stages: See :class:`AgentBackbone`.
        with_cp: Gradient checkpointing of each block.
        attn_impl: ``'fast'`` or ``'reference'`` agent attention.
        bias_cache_size: Input shapes whose bias maps each agent attention
            keeps in eval mode (0: none); see :class:`AgentAttention`.
        pretrained: Deprecated, use ``init_cfg``.
        init_cfg: Initialisation config.
    """
    _common = dict(
        agent_num=[9, 16, 49, 49],
        agent_shapes=[(9, 9), (12, 12), (14, 14), (7, 7)])
    arch_zoo = {
        'tiny':
        dict(
            embed_dims=96,
            depths=[2, 2, 6, 2],
            num_heads=[3, 6, 12, 24],
            attn_type='AAAB',
            **_common),
        'small':
        dict(
            embed_dims=96,
            depths=[2, 2, 18, 2],
            num_heads=[3, 6, 12, 24],
            attn_type='AABB',
            **_common),
        'base':
        dict(
            embed_dims=128,
            depths=[2, 2, 18, 2],
            num_heads=[4, 8, 16, 32],
            attn_type='AAMB2',
            **_common),
    }

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 embed_dims: Optional[int] = None,
                 depths: Optional[Sequence[int]] = None,
                 num_heads: Optional[Sequence[int]] = None,
                 agent_num: Optional[Sequence[int]] = None,
                 agent_shapes: Optional[Sequence[Tuple[int, int]]] = None,
                 attn_type: Optional[str] = None,
                 window_size: int = 7,
                 mlp_ratio: float = 4.,
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 attn_impl: str = 'fast',
                 bias_cache_size: int = BIAS_CACHE_SIZE,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[dict] = None):
        super().__init__(frozen_stages, pretrained, init_cfg)
        check_backbone_settings('AgentSwinTransformer', in_channels, drop_rate,
                                attn_drop_rate, drop_path_rate)
        check_int_range(
            'AgentSwinTransformer',
            'window_size',
            window_size,
            1,
            fix='The released models use 7.')
        check_positive('AgentSwinTransformer', 'mlp_ratio', mlp_ratio,
                       'The released models use 4.')
        settings = resolve_arch(
            'AgentSwinTransformer', self.arch_zoo, arch,
            dict(
                embed_dims=embed_dims,
                depths=depths,
                num_heads=num_heads,
                agent_num=agent_num,
                agent_shapes=agent_shapes,
                attn_type=attn_type))
        check_int_range(
            'AgentSwinTransformer',
            'embed_dims',
            settings['embed_dims'],
            1,
            fix='The released models use 96 or 128.')
        check_stage_lists('AgentSwinTransformer', NUM_STAGES, settings,
                          STAGE_LISTS)
        self.block_types = parse_attn_type(settings['attn_type'],
                                           settings['depths'])
        self.out_indices = check_out_indices('AgentSwinTransformer',
                                             out_indices, NUM_STAGES)
        self.in_channels = in_channels
        base_dims = settings['embed_dims']
        self.num_features = [base_dims * 2**i for i in range(NUM_STAGES)]
        check_stage_heads('AgentSwinTransformer', self.num_features,
                          settings['num_heads'])
        self.patch_embed = SwinPatchEmbed(in_channels, base_dims)
        self.pos_drop = nn.Dropout(drop_rate)

        drop_paths = linear_drop_path_rates(settings['depths'],
                                            drop_path_rate)
        self.layers = nn.ModuleList()
        for i, dims in enumerate(self.num_features):
            blocks = [
                AgentSwinBlock(
                    dims,
                    self._build_attn(settings, i, kind, dims, window_size,
                                     qkv_bias, attn_drop_rate, drop_rate,
                                     attn_impl, bias_cache_size),
                    shift=window_size // 2 if kind == 'B' and j % 2 else 0,
                    mlp_ratio=mlp_ratio,
                    drop_rate=drop_rate,
                    drop_path_rate=drop_paths[i][j],
                    with_cp=with_cp)
                for j, kind in enumerate(self.block_types[i])
            ]
            downsample = PatchMerging(dims) if i < NUM_STAGES - 1 else None
            self.layers.append(AgentSwinStage(blocks, downsample))
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(self.num_features[i]))

    @staticmethod
    def _build_attn(settings: dict, stage: int, kind: str, dims: int,
                    window_size: int, qkv_bias: bool, attn_drop: float,
                    proj_drop: float, attn_impl: str,
                    bias_cache_size: int) -> nn.Module:
        heads = settings['num_heads'][stage]
        if kind == 'B':
            return WindowAttention(dims, heads, window_size, qkv_bias,
                                   attn_drop, proj_drop)
        ref = REF_GRID // 2**stage
        return AgentAttention(
            dims,
            heads,
            ref_size=(ref, ref),
            agent_num=settings['agent_num'][stage],
            agent_shape=tuple(settings['agent_shapes'][stage]),
            qkv_bias=qkv_bias,
            fused_qkv=True,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            attn_impl=attn_impl,
            bias_cache_size=bias_cache_size)

    def frozen_modules(self) -> List[Optional[nn.Module]]:
        modules = [self.patch_embed] if self.frozen_stages >= 0 else []
        for i in range(self.frozen_stages):
            modules += [self.layers[i], getattr(self, f'norm{i}', None)]
        return modules

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        check_input('AgentSwinTransformer', x, self.in_channels,
                    MIN_INPUT_SIZE)
        x, hw_shape = self.patch_embed(x)
        x = self.pos_drop(x)
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x, hw_shape)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(x)
                outs.append(tokens_to_map(out, hw_shape).contiguous())
            if stage.downsample is not None:
                x, hw_shape = stage.downsample(x, hw_shape)
        return tuple(outs)
