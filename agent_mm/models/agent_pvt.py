"""Agent-PVT: Pyramid Vision Transformer with agent attention."""
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.model.weight_init import trunc_normal_
from mmengine.registry import MODELS
from torch import Tensor

from .base import AgentBackbone
from .bias_maps import resize
from .checks import check_stage_heads
from .layers import map_to_tokens, residual_sum, tokens_to_map
from .sr_attention import SpatialReductionAttention
from .transformer import NUM_STAGES, PatchEmbed, pretrain_grid

PATCH_SIZES = (4, 2, 2, 2)
# LayerNorm of the blocks, as released (the patch embeddings keep 1e-5)
BLOCK_NORM = dict(type='LN', eps=1e-6)


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
        embed_dims, depths, num_heads, mlp_ratios, sr_ratios, agent_num,
        agent_shapes: Per-stage overrides of the arch (4 entries each).
        attn_type: One letter per stage, 'A' agent attention, 'B' PVT
            spatial-reduction attention.
        kwargs: ``in_channels``, ``qkv_bias``, ``drop_rate`` (also after
            the position embeddings), ``attn_drop_rate``,
            ``drop_path_rate``, ``out_indices``, ``frozen_stages``,
            ``with_cp``, ``attn_impl``, ``bias_cache_size``, ``pretrained``,
            ``init_cfg``; see :class:`AgentBackbone`.
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
    stage_lists = ('depths', 'embed_dims', 'num_heads', 'mlp_ratios',
                   'sr_ratios', 'agent_num', 'agent_shapes')

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 embed_dims: Optional[Sequence[int]] = None,
                 depths: Optional[Sequence[int]] = None,
                 num_heads: Optional[Sequence[int]] = None,
                 mlp_ratios: Optional[Sequence[float]] = None,
                 sr_ratios: Optional[Sequence[int]] = None,
                 agent_num: Optional[Sequence[int]] = None,
                 agent_shapes: Optional[Sequence[Tuple[int, int]]] = None,
                 attn_type: Optional[str] = None,
                 **kwargs: Any):
        overrides = dict(
            embed_dims=embed_dims, depths=depths, num_heads=num_heads,
            mlp_ratios=mlp_ratios, sr_ratios=sr_ratios, agent_num=agent_num,
            agent_shapes=agent_shapes, attn_type=attn_type)
        super().__init__(arch, overrides, **kwargs)
        settings = self.arch_settings
        check_stage_heads('AgentPVT', settings['embed_dims'],
                          settings['num_heads'])
        self.attn_type = self._check_attn_type(settings['attn_type'])
        self.embed_dims = list(settings['embed_dims'])
        self.depths = list(settings['depths'])

        stage_in = self.in_channels
        for i, dims in enumerate(self.embed_dims):
            setattr(self, f'patch_embed{i + 1}',
                    PatchEmbed(stage_in, dims, PATCH_SIZES[i]))
            grid_h, grid_w = pretrain_grid(i)
            pos_embed = nn.Parameter(torch.zeros(1, grid_h * grid_w, dims))
            trunc_normal_(pos_embed, std=.02)
            setattr(self, f'pos_embed{i + 1}', pos_embed)
            setattr(self, f'pos_drop{i + 1}', nn.Dropout(self.drop_rate))
            setattr(
                self, f'block{i + 1}',
                self.make_blocks(
                    i,
                    dims,
                    lambda _, i=i: self._mixer(i),
                    settings['mlp_ratios'][i],
                    BLOCK_NORM))
            stage_in = dims

    @staticmethod
    def _check_attn_type(attn_type: str) -> str:
        if (not isinstance(attn_type, str) or len(attn_type) != NUM_STAGES
                or set(attn_type) - set('AB')):
            raise ValueError('AgentPVT attn_type must be 4 letters, one per '
                             "stage: 'A' (agent attention) or 'B' (spatial-"
                             f'reduction attention), got {attn_type!r}.')
        return attn_type

    def _mixer(self, stage: int) -> nn.Module:
        """The token mixer of a block of ``stage``."""
        dims = self.embed_dims[stage]
        if self.attn_type[stage] == 'A':
            return self.agent_attention(stage, dims, pretrain_grid(stage))
        return SpatialReductionAttention(
            dims, self.arch_settings['num_heads'][stage],
            self.arch_settings['sr_ratios'][stage], **self.mixer_cfg)

    def _pos_embed(self, stage: int, hw_shape: Tuple[int, int]) -> Tensor:
        """Stage position embedding resized to the token grid."""
        pos_embed = getattr(self, f'pos_embed{stage + 1}')
        grid = pretrain_grid(stage)
        if tuple(hw_shape) == grid:
            return pos_embed
        grid_map = pos_embed.reshape(1, *grid, -1).permute(0, 3, 1, 2)
        return map_to_tokens(resize(grid_map, hw_shape))

    def frozen_modules(self) -> List[Optional[nn.Module]]:
        modules = [self.patch_embed1] if self.frozen_stages >= 0 else []
        for i in range(1, self.frozen_stages + 1):
            modules += [
                getattr(self, f'patch_embed{i}'),
                getattr(self, f'block{i}')
            ]
        return modules

    def frozen_params(self) -> List[Optional[nn.Parameter]]:
        params = [self.pos_embed1] if self.frozen_stages >= 0 else []
        return params + [
            getattr(self, f'pos_embed{i}')
            for i in range(1, self.frozen_stages + 1)
        ]

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        self.check_input(x)
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
