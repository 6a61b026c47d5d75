"""What both agent backbones share: settings, agent attention and blocks,
position embeddings, init, pretrained loading, freezing."""
import copy
import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.model.weight_init import constant_init, trunc_normal_init
from torch import Tensor

from .agent_attention import BIAS_CACHE_SIZE, AgentAttention
from .bias_cache import ADMIT_AFTER, CacheBudget
from .checkpoint import load_backbone_checkpoint
from .checks import (check_backbone_settings, check_bool, check_input,
                     check_int_range, check_non_negative,
                     check_norm_and_act_cfgs, check_out_indices,
                     check_qk_scale, check_stage_lists, to_size_pair)
from .layers import (freeze, linear_drop_path_rates, residual_sum,
                     tokens_to_map, tokens_to_nchw)
from .transformer import (NUM_STAGES, PATCH_SIZES, PRETRAIN_IMG_SIZE,
                          TransformerBlock, learned_pos_embed, pretrain_grid,
                          resized_pos_embed)

# MiB that a backbone's bias caches hold together at most, by default:
# every benchmarked model and size fits whole (Agent-PVT-S at 1536², the
# largest, takes 3.0 GiB), and a large model's caches stay a few GiB on a
# GPU (two 800x1344 shapes take 8.4 GiB for Agent-PVT-L unbounded)
BIAS_CACHE_MAX_MB = 4096
# Short arch names, as in mmpretrain's arch_zoo.
ARCH_ALIASES = dict(t='tiny', s='small', m='medium', l='large', b='base')


def resolve_arch(backbone: str, arch_zoo: Dict[str, dict], arch: Any,
                 overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Settings of a named (or fully given) architecture, with overrides.

    Args:
        backbone: Class name, for error messages.
        arch_zoo: Named architectures, each a complete settings dict.
        arch: A name from ``arch_zoo`` (or its initial, see
            :data:`ARCH_ALIASES`) or a dict of all settings.
        overrides: Keyword overrides; ``None`` values are ignored.

    Raises:
        ValueError: Unknown name, or a dict lacking settings.
    """
    required = set(next(iter(arch_zoo.values())))
    if isinstance(arch, str):
        name = ARCH_ALIASES.get(arch, arch)
        if name not in arch_zoo:
            initials = sorted(k for k, v in ARCH_ALIASES.items()
                              if v in arch_zoo)
            raise ValueError(f'Unknown {backbone} arch {arch!r}; valid '
                             f'names: {sorted(arch_zoo)} or their initials '
                             f'{initials}, or a dict with the keys '
                             f'{sorted(required)}.')
        settings = copy.deepcopy(arch_zoo[name])
    elif isinstance(arch, dict):
        missing = required - set(arch)
        if missing:
            raise ValueError(f'A custom {backbone} arch must set '
                             f'{sorted(required)}; missing {sorted(missing)}.')
        settings = copy.deepcopy(arch)
    else:
        raise ValueError(f'{backbone} arch must be a name in '
                         f'{sorted(arch_zoo)} or a dict, got {arch!r}.')
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


class AgentBackbone(BaseModule):
    """Base of :class:`AgentPVT` and :class:`AgentSwinTransformer`.

    Subclasses give :attr:`arch_zoo` (named architectures) and
    :attr:`stage_lists` (the per-stage settings to validate), build their
    stages with :meth:`agent_attention`, :meth:`make_blocks` and
    :meth:`register_pos_embed`, and say what ``frozen_stages`` freezes.

    Every setting is validated at construction: a bad one raises a
    ``ValueError`` naming it, its value, the allowed range and a fix. An
    empty batch gives empty outputs ``(0, C_i, H_i, W_i)``.

    The keywords are those of mmdet's / mmseg's Swin and PVT backbones where
    the concept is the same, so that changing only ``type`` in their
    configs builds an agent backbone.

    Args:
        arch: A name of :attr:`arch_zoo` (or its initial, e.g. ``'t'``) or
            a dict with all its keys.
        overrides: Per-stage settings overriding the arch (None: keep).
        patch_sizes: Downsampling of each stage's patch embedding or
            merging (the subclass's geometry).
        pretrain_img_size: Side, or ``(height, width)``, of the
            pre-training images: the position embeddings and agent
            attention's row / column biases are sized for their token grids
            (and resized to the input's).
        in_channels: Image channels.
        out_indices: Stages whose outputs are returned.
        qkv_bias: Bias in the query, key and value projections. The output
            projection keeps its bias, as in the released models and
            mmdet's Swin (mmdet's PVT, on ``nn.MultiheadAttention``, drops
            it too).
        qk_scale: Factor of the dot products of every attention; None for
            ``head_dims ** -0.5``.
        drop_rate: Dropout in the MLPs and after the attention projections.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth, rising linearly to this value.
        norm_cfg: Every norm of the backbone (mmcv config of a norm over the
            channels of tokens, e.g. ``dict(type='LN', eps=1e-6)``); None
            keeps the released norms.
        act_cfg: The MLPs' activation (mmcv config); None for GELU.
        frozen_stages: Stages to freeze (parameters fixed, eval mode kept
            across ``train()``); -1 freezes nothing, 0 the first patch
            embedding with its position embedding and dropout (AgentPVT:
            ``patch_embed1``, ``pos_embed1``, ``pos_drop1``;
            AgentSwinTransformer: ``patch_embed``, ``absolute_pos_embed``,
            ``pos_drop``), k also the first k stages (AgentPVT: each
            stage's patch embedding, position embedding, dropout, blocks
            and norm; AgentSwinTransformer: each stage's blocks, the patch
            merging after it and its output norm).
        with_cp: Gradient checkpointing of each block.
        channels_last_outputs: Return each stage's output as a
            channels-last view of its tokens instead of a contiguous
            (NCHW) copy. The copy is saved and the convolutions of a neck
            and head of PyTorch's own layers (mmseg's FPN, UPerNet, FPN
            head) run in channels-last memory, faster on the CPU (the
            segmentation quick-start's training step: 0.92-0.94 of its
            time). Leave it off before mmcv's C++ ops, such as the RoIAlign
            of mmdet's two-stage heads, which read channels-last input
            wrongly (``SparseRoIAlign`` of :mod:`agent_mm.det` takes
            either layout).
        attn_impl: ``'fast'`` or ``'reference'`` agent attention.
        bias_cache_size: Input shapes whose bias maps each agent attention
            keeps in eval mode (0: none); see :class:`AgentAttention`.
        bias_cache_admit_after: Forward of an input shape from which its
            bias maps are cached (1: the first); see :class:`AgentAttention`.
        bias_cache_max_mb: MiB that the bias caches of all agent attentions
            hold together at most (None: no bound). Maps that do not fit are
            built at every forward; the first blocks' fit first. One input
            shape at 800×1344 takes about 0.6 GiB for Agent-PVT-T, 0.9 for
            Agent-Swin-T and 4.2 for Agent-PVT-L.
        convert_weights: mmdet's flag for checkpoints in the original Swin /
            PVT layout; the layout is recognised from the checkpoint's keys
            either way (see :func:`load_backbone_checkpoint`).
        pretrained: Deprecated, use ``init_cfg``.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` (``type``
            may be left out, as mmdet's Swin / PVT allow) loads the authors'
            ImageNet or downstream checkpoints, or plain Swin / PVT ImageNet
            ones.
    """
    arch_zoo: Dict[str, dict] = {}
    stage_lists: Tuple[str, ...] = ()

    def __init__(self,
                 arch: Any,
                 overrides: Dict[str, Any],
                 patch_sizes: Sequence[int] = PATCH_SIZES,
                 pretrain_img_size: Union[int,
                                          Sequence[int]] = PRETRAIN_IMG_SIZE,
                 in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 norm_cfg: Optional[dict] = None,
                 act_cfg: Optional[dict] = None,
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 channels_last_outputs: bool = False,
                 attn_impl: str = 'fast',
                 bias_cache_size: int = BIAS_CACHE_SIZE,
                 bias_cache_admit_after: int = ADMIT_AFTER,
                 bias_cache_max_mb: Optional[float] = BIAS_CACHE_MAX_MB,
                 convert_weights: bool = False,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[dict] = None):
        super().__init__(
            init_cfg=_pretrained_to_init_cfg(pretrained, init_cfg))
        name = type(self).__name__
        check_int_range(
            name,
            'frozen_stages',
            frozen_stages,
            -1,
            NUM_STAGES,
            fix='-1 freezes nothing, 0 the first patch embedding (and its '
            'position embedding), k also the first k stages.')
        check_backbone_settings(name, in_channels, drop_rate, attn_drop_rate,
                                drop_path_rate)
        check_qk_scale(name, qk_scale)
        check_norm_and_act_cfgs(name, norm_cfg, act_cfg)
        check_bool(name, 'convert_weights', convert_weights)
        check_bool(name, 'channels_last_outputs', channels_last_outputs)
        if bias_cache_max_mb is not None:
            check_non_negative(
                name,
                'bias_cache_max_mb',
                bias_cache_max_mb,
                fix='Give the MiB the bias caches may hold (0 keeps none), '
                'or None for no bound.')
        self.patch_sizes = self._check_patch_sizes(patch_sizes)
        self.pretrain_img_size = to_size_pair(
            name,
            'pretrain_img_size',
            pretrain_img_size,
            math.prod(self.patch_sizes),
            fix=f'Give the side of the pre-training images ('
            f'{PRETRAIN_IMG_SIZE} for the released models).')
        self.arch_settings = resolve_arch(name, self.arch_zoo, arch, overrides)
        check_stage_lists(name, NUM_STAGES, self.arch_settings,
                          self.stage_lists)
        self.out_indices = check_out_indices(name, out_indices, NUM_STAGES)
        self.in_channels = in_channels
        self.frozen_stages = frozen_stages
        self.with_cp = with_cp
        self.channels_last_outputs = channels_last_outputs
        self.drop_rate = drop_rate
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        self.convert_weights = convert_weights
        self.drop_path_rates = linear_drop_path_rates(
            self.arch_settings['depths'], drop_path_rate)
        # what every token mixer takes, and what agent attention adds
        self.mixer_cfg = dict(
            qkv_bias=qkv_bias,
            attn_drop=attn_drop_rate,
            proj_drop=drop_rate,
            qk_scale=qk_scale)
        self.agent_cfg = dict(
            attn_impl=attn_impl,
            bias_cache_size=bias_cache_size,
            bias_cache_admit_after=bias_cache_admit_after,
            bias_cache_budget=CacheBudget.of_mb(bias_cache_max_mb))

    def _check_patch_sizes(self,
                           patch_sizes: Sequence[int]) -> Tuple[int, ...]:
        """``patch_sizes`` as a tuple, once each stage's is an int >= 1."""
        check_stage_lists(
            type(self).__name__, NUM_STAGES, dict(patch_sizes=patch_sizes),
            ('patch_sizes', ))
        return tuple(patch_sizes)

    def pretrain_grid(self, stage: int) -> Tuple[int, int]:
        """Token grid of ``stage`` for a ``pretrain_img_size`` image."""
        return pretrain_grid(stage, self.pretrain_img_size, self.patch_sizes)

    def norm_cfg_or(self, default: dict) -> dict:
        """The ``norm_cfg`` given, or the released ``default``."""
        return self.norm_cfg if self.norm_cfg is not None else default

    def agent_attention(self, stage: int, embed_dims: int,
                        **kwargs: Any) -> AgentAttention:
        """The agent attention of a block of ``stage``: heads and agents
        from the arch settings, biases sized for the stage's pre-training
        grid, the backbone's mixer options, ``kwargs`` (e.g.
        ``fused_qkv``)."""
        settings = self.arch_settings
        return AgentAttention(
            embed_dims,
            settings['num_heads'][stage],
            pretrain_grid=self.pretrain_grid(stage),
            agent_num=settings['agent_num'][stage],
            agent_shape=tuple(settings['agent_shapes'][stage]),
            **self.mixer_cfg,
            **self.agent_cfg,
            **kwargs)

    def make_blocks(self, stage: int, embed_dims: int,
                    mixer: Callable[[int], nn.Module], mlp_ratio: float,
                    norm_cfg: dict) -> nn.ModuleList:
        """The blocks of ``stage``; ``mixer(j)`` builds the token mixer of
        block ``j``; ``norm_cfg`` is both norms of each block."""
        return nn.ModuleList(
            TransformerBlock(
                embed_dims,
                mixer(j),
                mlp_ratio,
                drop_rate=self.drop_rate,
                drop_path_rate=rate,
                with_cp=self.with_cp,
                norm_cfg=norm_cfg,
                act_cfg=self.act_cfg)
            for j, rate in enumerate(self.drop_path_rates[stage]))

    def register_pos_embed(self, name: str, stage: int, dims: int,
                           enabled: bool) -> None:
        """Register a learned position embedding ``name`` for the
        pre-training grid of ``stage`` (None when not ``enabled``)."""
        self.register_parameter(
            name,
            learned_pos_embed(self.pretrain_grid(stage), dims)
            if enabled else None)

    def add_pos_embed(self, x: Tensor, name: str, stage: int,
                      hw_shape: Tuple[int, int],
                      patch_embed: nn.Module) -> Tensor:
        """``x``, the tokens ``patch_embed`` returned, plus the position
        embedding ``name`` of ``stage`` resized to the token grid
        ``hw_shape``; ``x`` itself if there is none. In inference the sum is
        written into ``x`` unless a forward hook of ``patch_embed`` may have
        kept it (:func:`~.layers.residual_sum`)."""
        pos_embed = getattr(self, name)
        if pos_embed is None:
            return x
        return residual_sum(
            x,
            resized_pos_embed(pos_embed, self.pretrain_grid(stage), hw_shape),
            patch_embed)

    def stage_output(self, tokens: Tensor,
                     hw_shape: Tuple[int, int]) -> Tensor:
        """A stage's ``(B, H*W, C)`` output tokens as the ``(B, C, H, W)``
        map the backbone returns (see ``channels_last_outputs``)."""
        if self.channels_last_outputs:
            return tokens_to_map(tokens, hw_shape)
        return tokens_to_nchw(tokens, hw_shape)

    def check_input(self, img: Tensor) -> None:
        """Reject images the backbone cannot process, saying why."""
        check_input(
            type(self).__name__, img, self.in_channels,
            math.prod(self.patch_sizes))

    def frozen_modules(self) -> List[Optional[nn.Module]]:
        """Modules that ``frozen_stages`` freezes (per backbone)."""
        raise NotImplementedError

    def frozen_params(self) -> List[Optional[nn.Parameter]]:
        """Loose parameters that ``frozen_stages`` freezes (per backbone)."""
        return []

    def unbuilt_output_norms(self) -> List[str]:
        """Names of the output norms this backbone leaves out for the stages
        it does not output, which checkpoints of one that outputs them hold
        (none by default)."""
        return []

    def freeze_stages(self) -> None:
        """Freeze the ``frozen_stages`` (eval mode, no gradients). Called
        once the stages are built, so that a wrapper built before the first
        ``train()`` (e.g. ``DistributedDataParallel``, which mmengine wraps
        the model in first) sees their parameters without gradients, and
        again by every ``train()``."""
        freeze(self.frozen_modules(), self.frozen_params())

    def train(self, mode: bool = True) -> 'AgentBackbone':
        """Set the train mode, keeping frozen stages in eval mode."""
        super().train(mode)
        self.freeze_stages()
        return self

    def init_weights(self) -> None:
        """Random init, or a checkpoint via ``init_cfg``: a ``Pretrained``
        dict, or a list holding one, whose other entries mmengine applies
        first."""
        checkpoint, others = _split_pretrained(self.init_cfg)
        if checkpoint is not None:
            if others:
                init_cfg, self.init_cfg = self.init_cfg, others
                try:
                    super().init_weights()
                finally:
                    self.init_cfg = init_cfg
            load_backbone_checkpoint(self, checkpoint)
            self._is_init = True
            return
        if self.init_cfg is None:
            self.apply(_init_layer)
            self._is_init = True
            return
        super().init_weights()


def _is_pretrained(init_cfg: Any) -> bool:
    """Whether ``init_cfg`` is a ``Pretrained`` dict, also one without
    ``type`` (as mmdet's Swin / PVT configs give)."""
    return (isinstance(init_cfg, dict) and 'checkpoint' in init_cfg
            and init_cfg.get('type', 'Pretrained') == 'Pretrained')


def _split_pretrained(init_cfg: Any) -> Tuple[Optional[str], list]:
    """The checkpoint of ``init_cfg``'s ``Pretrained`` entry (None without
    one) and its other entries (a list)."""
    entries = init_cfg if isinstance(init_cfg, list) else [init_cfg]
    pretrained = [cfg for cfg in entries if _is_pretrained(cfg)]
    if not pretrained:
        return None, []
    if len(pretrained) > 1:
        raise ValueError(
            f'init_cfg holds {len(pretrained)} Pretrained entries; give one '
            'checkpoint.')
    others = [cfg for cfg in entries if not _is_pretrained(cfg)]
    return pretrained[0]['checkpoint'], others


def _pretrained_to_init_cfg(pretrained: Optional[str],
                            init_cfg: Optional[dict]) -> Optional[dict]:
    """The deprecated ``pretrained`` path as an ``init_cfg``."""
    if pretrained is None:
        return init_cfg
    if init_cfg is not None:
        raise ValueError('Set init_cfg=dict(type="Pretrained", '
                         'checkpoint=...) or pretrained, not both.')
    warnings.warn('DeprecationWarning: pretrained is deprecated, please use '
                  '"init_cfg=dict(type=\'Pretrained\', checkpoint=...)" '
                  'instead')
    return dict(type='Pretrained', checkpoint=pretrained)


def _init_layer(module: nn.Module) -> None:
    """Default init of the released models (PVT v1 / Swin style): linear
    layers truncated normal, norms identity; convolutions keep PyTorch's
    default init."""
    if isinstance(module, nn.Linear):
        trunc_normal_init(module, std=.02, bias=0.)
    elif isinstance(module, nn.LayerNorm):
        constant_init(module, val=1., bias=0.)
