"""Agent-Swin: Swin Transformer whose stages mix agent attention ('A')
blocks with shifted-window attention ('B') blocks."""
import re
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch import Tensor

from .base import AgentBackbone
from .checks import (check_bool, check_int_range, check_positive,
                     check_stage_heads, check_supported)
from .transformer import (LAYER_NORM, NUM_STAGES, PATCH_SIZES, PatchEmbed,
                          build_norm, optional_norm)
from .window_attention import ShiftWindowAttention
from .workspace import reuses_memory

# PatchMerging halves the grid between stages
MERGE_STRIDES = PATCH_SIZES[1:]


def swin_arch(embed_dims: int, depths: List[int], attn_type: str) -> dict:
    """A released Agent-Swin arch: heads of 32 channels, the released agent
    grids."""
    return dict(
        embed_dims=embed_dims,
        depths=depths,
        num_heads=[embed_dims // 32 * 2**i for i in range(NUM_STAGES)],
        attn_type=attn_type,
        agent_num=[9, 16, 49, 49],
        agent_shapes=[(9, 9), (12, 12), (14, 14), (7, 7)])


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
                raise ValueError(
                    f'attn_type {attn_type!r} asks for {num_agent} agent '
                    f'blocks in a stage of {depth} blocks: end attn_type '
                    f"with at most {depth}, or give the 'M' stage at least "
                    f'{num_agent} blocks in depths.')
            stage_types.append('A' * num_agent + 'B' * (depth - num_agent))
        else:
            stage_types.append(letter * depth)
    return stage_types


class PatchMerging(BaseModule):
    """2×2 neighbourhood → one token: a norm of the ``4C`` channels
    (``norm_cfg``, mmcv config; None for none), then ``Linear(4C, 2C)``;
    odd sides are padded bottom/right."""

    def __init__(self, embed_dims: int, norm_cfg: Optional[dict] = LAYER_NORM):
        super().__init__()
        self.norm = optional_norm(norm_cfg, 4 * embed_dims)
        self.reduction = nn.Linear(4 * embed_dims, 2 * embed_dims, bias=False)

    def forward(self, x: Tensor,
                hw_shape: Tuple[int, int]) -> Tuple[Tensor, Tuple[int, int]]:
        height, width = hw_shape
        x = x.unflatten(1, hw_shape)
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        phases = [
            x[:, r::2, c::2] for r, c in ((0, 0), (1, 0), (0, 1), (1, 1))
        ]
        x = torch.cat(phases, dim=-1)
        out_shape = tuple(x.shape[1:3])
        x = self.reduction(self.norm(x.flatten(1, 2)))
        return x, out_shape


class AgentSwinStage(BaseModule):
    """The blocks of one stage, run by :meth:`forward`, and the patch
    merging after them (``downsample``, None in the last stage), which
    :class:`AgentSwinTransformer` applies once it has taken the stage's
    output."""

    def __init__(self, blocks: nn.ModuleList,
                 downsample: Optional[PatchMerging]):
        super().__init__()
        self.blocks = blocks
        self.downsample = downsample

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        for block in self.blocks:
            x = block(x, hw_shape)
        return x


@MODELS.register_module()
class AgentSwinTransformer(AgentBackbone):
    """Agent-Swin backbone (Han et al., "Agent Attention", ECCV 2024).

    Parameter names follow the authors' release. Outputs, for each index in
    ``out_indices``, the stage's features before merging, through
    ``norm{i}``, as ``(B, C·2^i, H_i, W_i)`` at strides 4, 8, 16, 32.

    Takes every keyword of mmdet's and mmseg's ``SwinTransformer``, so that
    changing only ``type`` in their configs builds an Agent-Swin; a value
    that Agent-Swin cannot honour is a ``ValueError`` saying what is
    supported.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` (or ``'t'``, ``'s'``,
            ``'b'``) or a dict with every key of :attr:`arch_zoo` entries.
        embed_dims: Channels of stage 0 (doubling at each stage).
        depths, num_heads, agent_num, agent_shapes: Per-stage overrides.
        attn_type: Stage code, see :func:`parse_attn_type`.
        window_size: Window of the 'B' blocks.
        mlp_ratio: MLP hidden ratio.
        patch_size: Side (and stride) of the patches of the embedding.
        strides: Must be ``(patch_size, 2, 2, 2)`` (None: that).
        patch_norm: A norm after the patch embedding and in each patch
            merging.
        use_abs_pos_embed: A learned position embedding
            ``absolute_pos_embed`` after the patch embedding, sized for
            ``pretrain_img_size`` and resized to the input.
        kwargs: ``pretrain_img_size``, ``in_channels``, ``qkv_bias``,
            ``qk_scale``, ``drop_rate``, ``attn_drop_rate``,
            ``drop_path_rate``, ``norm_cfg``, ``act_cfg``, ``out_indices``,
            ``frozen_stages``, ``with_cp``, ``channels_last_outputs``,
            ``attn_impl``, ``bias_cache_size``, ``bias_cache_admit_after``,
            ``bias_cache_max_mb``, ``convert_weights``, ``pretrained``,
            ``init_cfg``; see
            :class:`AgentBackbone`.
    """
    arch_zoo = {
        'tiny': swin_arch(96, [2, 2, 6, 2], 'AAAB'),
        'small': swin_arch(96, [2, 2, 18, 2], 'AABB'),
        'base': swin_arch(128, [2, 2, 18, 2], 'AAMB2'),
    }
    stage_lists = ('depths', 'num_heads', 'agent_num', 'agent_shapes')

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 embed_dims: Optional[int] = None,
                 depths: Optional[Sequence[int]] = None,
                 num_heads: Optional[Sequence[int]] = None,
                 agent_num: Optional[Sequence[int]] = None,
                 agent_shapes: Optional[Sequence[Tuple[int, int]]] = None,
                 attn_type: Optional[str] = None,
                 window_size: int = 7,
                 mlp_ratio: float = 4.,
                 patch_size: int = PATCH_SIZES[0],
                 strides: Optional[Sequence[int]] = None,
                 patch_norm: bool = True,
                 use_abs_pos_embed: bool = False,
                 **kwargs: Any):
        name = 'AgentSwinTransformer'
        check_int_range(name, 'patch_size', patch_size, 1,
                        fix='The released models use 4.')
        overrides = dict(
            embed_dims=embed_dims, depths=depths, num_heads=num_heads,
            agent_num=agent_num, agent_shapes=agent_shapes,
            attn_type=attn_type)
        super().__init__(
            arch,
            overrides,
            patch_sizes=(patch_size, *MERGE_STRIDES),
            **kwargs)
        self._check_swin_settings(window_size, mlp_ratio, strides,
                                  patch_norm, use_abs_pos_embed)
        settings = self.arch_settings
        check_int_range(
            name,
            'embed_dims',
            settings['embed_dims'],
            1,
            fix='The released models use 96 or 128.')
        self.block_types = parse_attn_type(settings['attn_type'],
                                           settings['depths'])
        base_dims = settings['embed_dims']
        self.num_features = [base_dims * 2**i for i in range(NUM_STAGES)]
        check_stage_heads(name, self.num_features, settings['num_heads'])
        self.window_size = window_size
        norm_cfg = self.norm_cfg_or(LAYER_NORM)
        patch_norm_cfg = norm_cfg if patch_norm else None
        self.patch_embed = PatchEmbed(
            self.in_channels,
            base_dims,
            patch_size,
            pad=True,
            norm_cfg=patch_norm_cfg)
        self.register_pos_embed('absolute_pos_embed', 0, base_dims,
                                use_abs_pos_embed)
        self.pos_drop = nn.Dropout(self.drop_rate)

        self.layers = nn.ModuleList()
        for i, dims in enumerate(self.num_features):
            blocks = self.make_blocks(i, dims,
                                      lambda j, i=i: self._mixer(i, j),
                                      mlp_ratio, norm_cfg)
            downsample = (
                PatchMerging(dims, patch_norm_cfg)
                if i < NUM_STAGES - 1 else None)
            self.layers.append(AgentSwinStage(blocks, downsample))
        for i in self.out_indices:
            self.add_module(f'norm{i}', build_norm(norm_cfg,
                                                   self.num_features[i]))
        self.freeze_stages()

    def _check_swin_settings(self, window_size: Any, mlp_ratio: Any,
                             strides: Any, patch_norm: Any,
                             use_abs_pos_embed: Any) -> None:
        """Validate the Swin keywords."""
        name = type(self).__name__
        check_int_range(name, 'window_size', window_size, 1,
                        fix='The released models use 7.')
        check_positive(name, 'mlp_ratio', mlp_ratio,
                       'The released models use 4.')
        if strides is not None:
            check_supported(
                name, 'strides', strides, self.patch_sizes,
                'The first stride is the patch size and Agent-Swin merges '
                '2x2 patches between stages.')
        check_bool(name, 'patch_norm', patch_norm)
        check_bool(name, 'use_abs_pos_embed', use_abs_pos_embed)

    def _mixer(self, stage: int, block: int) -> nn.Module:
        """The token mixer of block ``block`` of ``stage``: agent attention
        over the whole map, or window attention shifted in every second
        block."""
        dims = self.num_features[stage]
        if self.block_types[stage][block] == 'A':
            return self.agent_attention(stage, dims, fused_qkv=True)
        return ShiftWindowAttention(
            dims,
            self.arch_settings['num_heads'][stage],
            self.window_size,
            shift=self.window_size // 2 if block % 2 else 0,
            **self.mixer_cfg)

    def unbuilt_output_norms(self) -> List[str]:
        """The output norms ``norm{i}`` of the stages not in
        ``out_indices``."""
        return [
            f'norm{i}' for i in range(NUM_STAGES) if i not in self.out_indices
        ]

    def frozen_modules(self) -> List[Optional[nn.Module]]:
        modules = ([self.patch_embed, self.pos_drop]
                   if self.frozen_stages >= 0 else [])
        for i in range(self.frozen_stages):
            modules += [self.layers[i], getattr(self, f'norm{i}', None)]
        return modules

    def frozen_params(self) -> List[Optional[nn.Parameter]]:
        return [self.absolute_pos_embed] if self.frozen_stages >= 0 else []

    @reuses_memory
    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        self.check_input(x)
        x, hw_shape = self.patch_embed(x)
        x = self.pos_drop(
            self.add_pos_embed(x, 'absolute_pos_embed', 0, hw_shape,
                               self.patch_embed))
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x, hw_shape)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(x)
                outs.append(self.stage_output(out, hw_shape))
            if stage.downsample is not None:
                x, hw_shape = stage.downsample(x, hw_shape)
        return tuple(outs)
