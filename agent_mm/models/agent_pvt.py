"""Agent-PVT: Pyramid Vision Transformer with agent attention."""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmengine.registry import MODELS
from torch import Tensor

from .agent_attention import BIAS_CACHE_SIZE, AgentAttention, resize
from .base import NUM_STAGES, AgentBackbone
from .layers import (ChannelsLastConv2d, Mlp, check_backbone_settings,
                     check_input, check_num_heads, check_out_indices,
                     check_stage_heads, check_stage_lists,
                     drop_path_or_identity, linear_drop_path_rates,
                     map_to_tokens, maybe_checkpoint, mlp_residual,
                     residual_sum, resolve_arch, tokens_to_map)

REF_GRIDS = ((56, 56), (28, 28), (14, 14), (7, 7))
PATCH_SIZES = (4, 2, 2, 2)
MIN_INPUT_SIZE = 32
STAGE_LISTS = ('depths', 'embed_dims', 'num_heads', 'mlp_ratios',
               'sr_ratios', 'agent_num', 'agent_shapes')


class SpatialReductionAttention(BaseModule):
    """PVT attention whose keys/values come from a map shrunk by
    ``sr_ratio`` (the 'B' stage type)."""

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 sr_ratio: int,
                 qkv_bias: bool = True,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        check_num_heads(
            type(self).__name__, 'num_heads', num_heads, embed_dims)
        self.num_heads = num_heads
        self.attn_drop_rate = attn_drop
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(embed_dims, embed_dims, bias=qkv_bias)
        self.kv = nn.Linear(embed_dims, embed_dims * 2, bias=qkv_bias)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = ChannelsLastConv2d(
                embed_dims, embed_dims, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        batch, tokens, channels = x.shape
        source = x
        if self.sr_ratio > 1:
            source = tokens_to_map(x, hw_shape)
            source = self.norm(map_to_tokens(self.sr(source)))

        def heads(t: Tensor) -> Tensor:
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        key, value = self.kv(source).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(
            heads(self.q(x)),
            heads(key),
            heads(value),
            dropout_p=self.attn_drop_rate if self.training else 0.)
        out = out.transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj_drop(self.proj(out))


class AgentPVTBlock(BaseModule):
    """Pre-norm transformer block; norms use eps 1e-6 as released."""

    def __init__(self, embed_dims: int, mlp_ratio: float, attn: nn.Module,
                 drop_rate: float, drop_path_rate: float, with_cp: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dims, eps=1e-6)
        self.attn = attn
        self.drop_path = drop_path_or_identity(drop_path_rate)
        self.norm2 = nn.LayerNorm(embed_dims, eps=1e-6)
        self.mlp = Mlp(embed_dims, int(embed_dims * mlp_ratio), drop_rate)
        self.with_cp = with_cp

    def _forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        x = residual_sum(
            self.drop_path(self.attn(self.norm1(x), hw_shape)), x)
        return mlp_residual(x, self.norm2, self.mlp, self.drop_path,
                            self.training)

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        return maybe_checkpoint(
            self._forward, x, hw_shape, enabled=self.with_cp)


class PatchEmbed(BaseModule):
    """Non-overlapping patches (sizes floor) then ``LayerNorm``."""

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int):
        super().__init__()
        self.proj = ChannelsLastConv2d(
            in_channels, embed_dims, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        x = self.proj(x)
        hw_shape = tuple(x.shape[-2:])
        return self.norm(map_to_tokens(x)), hw_shape


@MODELS.register_module()
class AgentPVT(AgentBackbone):
    """Agent-PVT backbone (Han et al., "Agent Attention", ECCV 2024).

    Parameter names follow the authors' release, so their checkpoints load
    as released. Each of the four stages is patch embedding → position
    embedding (resized to the token grid) → blocks; every stage output is a
    feature map ``(B, C_i, H_i, W_i)`` at strides 4, 8, 16, 32.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'medium'``, ``'large'`` or a dict
            with every key of :attr:`arch_zoo` entries.
        in_channels: Image channels.
        embed_dims, depths, num_heads, mlp_ratios, sr_ratios, agent_num,
        agent_shapes: Per-stage overrides of the arch (4 entries each).
        attn_type: One letter per stage, 'A' agent attention, 'B' PVT
            spatial-reduction attention.
        qkv_bias: Bias in the q/kv projections.
        drop_rate: Dropout after position embedding and in the MLPs.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth, rising linearly to this value.
        out_indices: Stages whose outputs are returned.
        frozen_stages: See :class:`AgentBackbone`.
        with_cp: Gradient checkpointing of each block (saves memory).
        attn_impl: ``'fast'`` or ``'reference'`` agent attention.
        bias_cache_size: Input shapes whose bias maps each agent attention
            keeps in eval mode (0: none); see :class:`AgentAttention`.
        pretrained: Deprecated, use ``init_cfg``.
        init_cfg: Initialisation config.
    """
    _common = dict(
        embed_dims=[64, 128, 320, 512],
        num_heads=[1, 2, 5, 8],
        mlp_ratios=[8, 8, 4, 4],
        sr_ratios=[8, 4, 2, 1],
        agent_num=[9, 16, 49, 49],
        agent_shapes=[(12, 12), (16, 16), (28, 28), (28, 28)],
        attn_type='AAAA')
    arch_zoo = {
        'tiny': dict(depths=[2, 2, 2, 2], **_common),
        'small': dict(depths=[3, 4, 6, 3], **_common),
        'medium': dict(depths=[3, 4, 18, 3], **_common),
        'large': dict(depths=[3, 8, 27, 3], **_common),
    }

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 embed_dims: Optional[Sequence[int]] = None,
                 depths: Optional[Sequence[int]] = None,
                 num_heads: Optional[Sequence[int]] = None,
                 mlp_ratios: Optional[Sequence[float]] = None,
                 sr_ratios: Optional[Sequence[int]] = None,
                 agent_num: Optional[Sequence[int]] = None,
                 agent_shapes: Optional[Sequence[Tuple[int, int]]] = None,
                 attn_type: Optional[str] = None,
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
        check_backbone_settings('AgentPVT', in_channels, drop_rate,
                                attn_drop_rate, drop_path_rate)
        settings = resolve_arch(
            'AgentPVT', self.arch_zoo, arch,
            dict(
                embed_dims=embed_dims,
                depths=depths,
                num_heads=num_heads,
                mlp_ratios=mlp_ratios,
                sr_ratios=sr_ratios,
                agent_num=agent_num,
                agent_shapes=agent_shapes,
                attn_type=attn_type))
        check_stage_lists('AgentPVT', NUM_STAGES, settings, STAGE_LISTS)
        check_stage_heads('AgentPVT', settings['embed_dims'],
                          settings['num_heads'])
        self.attn_type = self._check_attn_type(settings['attn_type'])
        self.out_indices = check_out_indices('AgentPVT', out_indices,
                                             NUM_STAGES)
        self.in_channels = in_channels
        self.embed_dims = list(settings['embed_dims'])
        self.depths = list(settings['depths'])
        self.with_cp = with_cp

        drop_paths = linear_drop_path_rates(self.depths, drop_path_rate)
        stage_in = in_channels
        for i in range(NUM_STAGES):
            dims = self.embed_dims[i]
            setattr(self, f'patch_embed{i + 1}',
                    PatchEmbed(stage_in, dims, PATCH_SIZES[i]))
            pos_embed = nn.Parameter(
                torch.zeros(1, REF_GRIDS[i][0] * REF_GRIDS[i][1], dims))
            trunc_normal_(pos_embed, std=.02)
            setattr(self, f'pos_embed{i + 1}', pos_embed)
            setattr(self, f'pos_drop{i + 1}', nn.Dropout(drop_rate))
            blocks = nn.ModuleList([
                AgentPVTBlock(
                    dims,
                    settings['mlp_ratios'][i],
                    self._build_attn(settings, i, qkv_bias, attn_drop_rate,
                                     drop_rate, attn_impl, bias_cache_size),
                    drop_rate,
                    rate,
                    with_cp,
                ) for rate in drop_paths[i]
            ])
            setattr(self, f'block{i + 1}', blocks)
            stage_in = dims

    @staticmethod
    def _check_attn_type(attn_type: str) -> str:
        if (not isinstance(attn_type, str) or len(attn_type) != NUM_STAGES
                or set(attn_type) - set('AB')):
            raise ValueError('AgentPVT attn_type must be 4 letters, one per '
                             "stage: 'A' (agent attention) or 'B' (spatial-"
                             f'reduction attention), got {attn_type!r}.')
        return attn_type

    def _build_attn(self, settings: dict, stage: int, qkv_bias: bool,
                    attn_drop: float, proj_drop: float, attn_impl: str,
                    bias_cache_size: int) -> nn.Module:
        dims = settings['embed_dims'][stage]
        heads = settings['num_heads'][stage]
        if self.attn_type[stage] == 'B':
            return SpatialReductionAttention(dims, heads,
                                             settings['sr_ratios'][stage],
                                             qkv_bias, attn_drop, proj_drop)
        return AgentAttention(
            dims,
            heads,
            ref_size=REF_GRIDS[stage],
            agent_num=settings['agent_num'][stage],
            agent_shape=tuple(settings['agent_shapes'][stage]),
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            attn_impl=attn_impl,
            bias_cache_size=bias_cache_size)

    def _pos_embed(self, stage: int, hw_shape: Tuple[int, int]) -> Tensor:
        """Stage position embedding resized to the token grid."""
        pos_embed = getattr(self, f'pos_embed{stage + 1}')
        if tuple(hw_shape) == REF_GRIDS[stage]:
            return pos_embed
        ref_h, ref_w = REF_GRIDS[stage]
        grid = pos_embed.reshape(1, ref_h, ref_w, -1).permute(0, 3, 1, 2)
        return map_to_tokens(resize(grid, hw_shape))

    def frozen_modules(self) -> List[Optional[nn.Module]]:
        modules = [self.patch_embed1] if self.frozen_stages >= 0 else []
        for i in range(1, self.frozen_stages + 1):
            modules += [getattr(self, f'patch_embed{i}'),
                        getattr(self, f'block{i}')]
        return modules

    def frozen_params(self) -> List[Optional[nn.Parameter]]:
        params = [self.pos_embed1] if self.frozen_stages >= 0 else []
        return params + [
            getattr(self, f'pos_embed{i}')
            for i in range(1, self.frozen_stages + 1)
        ]

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        check_input('AgentPVT', x, self.in_channels, MIN_INPUT_SIZE)
        outs = []
        for i in range(NUM_STAGES):
            x, hw_shape = getattr(self, f'patch_embed{i + 1}')(x)
            x = getattr(self, f'pos_drop{i + 1}')(
                residual_sum(x, self._pos_embed(i, hw_shape)))
            for block in getattr(self, f'block{i + 1}'):
                x = block(x, hw_shape)
            x = tokens_to_map(x, hw_shape)
            if i in self.out_indices:
                outs.append(x.contiguous())
        return tuple(outs)
