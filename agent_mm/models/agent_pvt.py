"""Agent-PVT: Pyramid Vision Transformer with agent attention."""
import numbers
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch.nn as nn
from mmengine.registry import MODELS
from torch import Tensor

from .base import AgentBackbone
from .checks import (check_alias, check_bool, check_int_range,
                     check_stage_heads, check_supported)
from .layers import tokens_to_map
from .sr_attention import SpatialReductionAttention
from .transformer import (LAYER_NORM, NUM_STAGES, PATCH_SIZES, PatchEmbed,
                          build_norm)
from .workspace import reuses_memory

# LayerNorm of the blocks, as released (the patch embeddings and the
# spatial reductions keep 1e-5)
BLOCK_NORM = dict(type='LN', eps=1e-6)
# mmdet's PVT: an int ``embed_dims`` (its default) is channels per head
MMDET_HEAD_DIMS = 64
NON_OVERLAPPING = ('Agent-PVT embeds non-overlapping, unpadded patches (PVT '
                   'v1); overlapping ones (PVT v2) are not supported.')


@MODELS.register_module()
class AgentPVT(AgentBackbone):
    """Agent-PVT backbone (Han et al., "Agent Attention", ECCV 2024).

    Parameter names follow the authors' release, so their checkpoints load
    as released. Each of the four stages is patch embedding → position
    embedding (resized to the token grid) → blocks; every stage output is a
    feature map ``(B, C_i, H_i, W_i)`` at strides 4, 8, 16, 32.

    Takes every keyword of mmdet's ``PyramidVisionTransformer`` (v1), so
    that changing only ``type`` in its configs builds an Agent-PVT; a value
    that Agent-PVT cannot honour is a ``ValueError`` saying what is
    supported.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'medium'``, ``'large'`` (or
            ``'t'``, ``'s'``, ``'m'``, ``'l'``) or a dict with every key of
            :attr:`arch_zoo` entries.
        embed_dims: Channels of each stage (4 entries), or, as in mmdet, one
            int: the channels per head (stage ``i`` has ``embed_dims *
            num_heads[i]``). Not given: the arch's, or with ``num_heads``
            given, 64 per head (mmdet's default).
        depths, num_heads, mlp_ratios, sr_ratios, agent_num,
        agent_shapes: Per-stage overrides of the arch (4 entries each).
            ``sr_ratios`` reduce the keys of the PVT-attention ('B')
            stages only: agent attention reads every token (as released).
            ``depths`` not given are the arch's (tiny by default; mmdet's
            PVT defaults to PVT-Small's depths, which its configs set).
        num_layers: mmdet's name for ``depths``.
        attn_type: One letter per stage, 'A' agent attention, 'B' PVT
            spatial-reduction attention.
        num_stages: Must be 4.
        patch_sizes: Patch side of each stage's embedding.
        strides: Must equal ``patch_sizes`` (None: mmdet's default, ``(4,
            2, 2, 2)``).
        paddings: Must be zeros.
        use_abs_pos_embed: Learned position embeddings ``pos_embed{i}``,
            sized for ``pretrain_img_size`` and resized to the input, with
            ``drop_rate`` dropout after them.
        norm_after_stage: A norm ``norm{i}`` after the blocks of each stage.
        use_conv_ffn: Must be False.
        norm_cfg: Every norm (patch embeddings, blocks, spatial reductions,
            ``norm_after_stage``); None keeps the released ones, LayerNorm
            with eps 1e-6 in the blocks and 1e-5 elsewhere.
        kwargs: ``pretrain_img_size``, ``in_channels``, ``qkv_bias``,
            ``qk_scale``, ``drop_rate`` (also after the position
            embeddings), ``attn_drop_rate``, ``drop_path_rate``,
            ``act_cfg``, ``out_indices``, ``frozen_stages``, ``with_cp``,
            ``channels_last_outputs``, ``attn_impl``, ``bias_cache_size``,
            ``bias_cache_admit_after``, ``bias_cache_max_mb``,
            ``convert_weights``, ``pretrained``, ``init_cfg``; see
            :class:`AgentBackbone`.
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
                 embed_dims: Optional[Union[int, Sequence[int]]] = None,
                 depths: Optional[Sequence[int]] = None,
                 num_heads: Optional[Sequence[int]] = None,
                 mlp_ratios: Optional[Sequence[float]] = None,
                 sr_ratios: Optional[Sequence[int]] = None,
                 agent_num: Optional[Sequence[int]] = None,
                 agent_shapes: Optional[Sequence[Tuple[int, int]]] = None,
                 attn_type: Optional[str] = None,
                 num_layers: Optional[Sequence[int]] = None,
                 num_stages: int = NUM_STAGES,
                 patch_sizes: Sequence[int] = PATCH_SIZES,
                 strides: Optional[Sequence[int]] = None,
                 paddings: Sequence[int] = (0, ) * NUM_STAGES,
                 use_abs_pos_embed: bool = True,
                 norm_after_stage: bool = False,
                 use_conv_ffn: bool = False,
                 **kwargs: Any):
        if embed_dims is None and num_heads is not None:
            embed_dims = MMDET_HEAD_DIMS
        head_dims = embed_dims if isinstance(embed_dims,
                                             numbers.Integral) else None
        overrides = dict(
            embed_dims=None if head_dims is not None else embed_dims,
            depths=check_alias('AgentPVT', 'depths', depths, 'num_layers',
                               num_layers),
            num_heads=num_heads, mlp_ratios=mlp_ratios, sr_ratios=sr_ratios,
            agent_num=agent_num, agent_shapes=agent_shapes,
            attn_type=attn_type)
        super().__init__(arch, overrides, patch_sizes=patch_sizes, **kwargs)
        self._check_mmdet_settings(num_stages, strides, paddings,
                                   use_abs_pos_embed, norm_after_stage,
                                   use_conv_ffn)
        settings = self.arch_settings
        if head_dims is not None:
            settings['embed_dims'] = self._dims_from_heads(
                head_dims, settings['num_heads'])
        check_stage_heads('AgentPVT', settings['embed_dims'],
                          settings['num_heads'])
        self.attn_type = self._check_attn_type(settings['attn_type'])
        self.embed_dims = list(settings['embed_dims'])
        self.depths = list(settings['depths'])
        self._build_stages(use_abs_pos_embed, norm_after_stage)
        self.freeze_stages()

    def _build_stages(self, use_abs_pos_embed: bool,
                      norm_after_stage: bool) -> None:
        """``patch_embed{i}``, ``pos_embed{i}``, ``pos_drop{i}``,
        ``block{i}`` and ``norm{i}`` of each stage ``i`` (1-based)."""
        stage_in = self.in_channels
        block_norm = self.norm_cfg_or(BLOCK_NORM)
        for i, dims in enumerate(self.embed_dims):
            setattr(
                self, f'patch_embed{i + 1}',
                PatchEmbed(stage_in, dims, self.patch_sizes[i],
                           norm_cfg=self.norm_cfg_or(LAYER_NORM)))
            self.register_pos_embed(f'pos_embed{i + 1}', i, dims,
                                    use_abs_pos_embed)
            # dropout of the position embeddings (none without, as mmdet's)
            setattr(
                self, f'pos_drop{i + 1}',
                nn.Dropout(self.drop_rate)
                if use_abs_pos_embed else nn.Identity())
            setattr(
                self, f'block{i + 1}',
                self.make_blocks(i, dims, lambda _, i=i: self._mixer(i),
                                 self.arch_settings['mlp_ratios'][i],
                                 block_norm))
            self.add_module(
                f'norm{i + 1}',
                build_norm(block_norm, dims) if norm_after_stage else None)
            stage_in = dims

    def _check_mmdet_settings(self, num_stages: Any, strides: Any,
                              paddings: Any, use_abs_pos_embed: Any,
                              norm_after_stage: Any,
                              use_conv_ffn: Any) -> None:
        """Validate the keywords of mmdet's PVT that Agent-PVT takes only
        at some values."""
        name = 'AgentPVT'
        check_supported(name, 'num_stages', num_stages, NUM_STAGES,
                        'Agent-PVT has four stages.')
        check_supported(
            name, 'strides', PATCH_SIZES if strides is None else strides,
            self.patch_sizes,
            NON_OVERLAPPING + ' As in mmdet, strides not given are '
            f'{PATCH_SIZES}: with other patch_sizes, give the same strides.')
        check_supported(name, 'paddings', paddings, (0, ) * NUM_STAGES,
                        NON_OVERLAPPING)
        for flag, value in (('use_abs_pos_embed', use_abs_pos_embed),
                            ('norm_after_stage', norm_after_stage),
                            ('use_conv_ffn', use_conv_ffn)):
            check_bool(name, flag, value)
        check_supported(
            name, 'use_conv_ffn', use_conv_ffn, False,
            "Agent-PVT's blocks have PVT v1's MLP; the convolutional FFN "
            '(PVT v2) is not supported.')

    @staticmethod
    def _dims_from_heads(head_dims: int, num_heads: Sequence[int]) -> list:
        """mmdet's stage channels: ``head_dims`` per head."""
        check_int_range(
            'AgentPVT',
            'embed_dims',
            head_dims,
            1,
            fix='An int is the channels per head (64 as released, giving '
            '64, 128, 320, 512); or give 4 per-stage channels.')
        return [head_dims * heads for heads in num_heads]

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
            return self.agent_attention(stage, dims)
        return SpatialReductionAttention(
            dims,
            self.arch_settings['num_heads'][stage],
            self.arch_settings['sr_ratios'][stage],
            norm_cfg=self.norm_cfg_or(LAYER_NORM),
            **self.mixer_cfg)

    def frozen_modules(self) -> List[Optional[nn.Module]]:
        modules = ([self.patch_embed1, self.pos_drop1]
                   if self.frozen_stages >= 0 else [])
        for i in range(1, self.frozen_stages + 1):
            modules += [
                getattr(self, f'{part}{i}')
                for part in ('patch_embed', 'pos_drop', 'block', 'norm')
            ]
        return modules

    def frozen_params(self) -> List[Optional[nn.Parameter]]:
        params = [self.pos_embed1] if self.frozen_stages >= 0 else []
        return params + [
            getattr(self, f'pos_embed{i}')
            for i in range(1, self.frozen_stages + 1)
        ]

    @reuses_memory
    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        self.check_input(x)
        outs = []
        for i in range(NUM_STAGES):
            patch_embed = getattr(self, f'patch_embed{i + 1}')
            x, hw_shape = patch_embed(x)
            x = getattr(self, f'pos_drop{i + 1}')(
                self.add_pos_embed(x, f'pos_embed{i + 1}', i, hw_shape,
                                   patch_embed))
            for block in getattr(self, f'block{i + 1}'):
                x = block(x, hw_shape)
            norm = getattr(self, f'norm{i + 1}')
            if norm is not None:
                x = norm(x)
            if i in self.out_indices:
                outs.append(self.stage_output(x, hw_shape))
            x = tokens_to_map(x, hw_shape)
        return tuple(outs)
