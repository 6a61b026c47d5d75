"""What both agent backbones share: settings, agent attention and blocks,
init, pretrained loading, freezing."""
import copy
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.model.weight_init import constant_init, trunc_normal_init
from torch import Tensor

from .agent_attention import BIAS_CACHE_SIZE, AgentAttention
from .checkpoint import load_backbone_checkpoint
from .checks import (check_backbone_settings, check_input, check_int_range,
                     check_out_indices, check_stage_lists)
from .layers import freeze, linear_drop_path_rates
from .transformer import MIN_INPUT_SIZE, NUM_STAGES, TransformerBlock


def resolve_arch(backbone: str, arch_zoo: Dict[str, dict], arch: Any,
                 overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Settings of a named (or fully given) architecture, with overrides.

    Args:
        backbone: Class name, for error messages.
        arch_zoo: Named architectures, each a complete settings dict.
        arch: A name from ``arch_zoo`` or a dict of all settings.
        overrides: Keyword overrides; ``None`` values are ignored.

    Raises:
        ValueError: Unknown name, or a dict lacking settings.
    """
    required = set(next(iter(arch_zoo.values())))
    if isinstance(arch, str):
        if arch not in arch_zoo:
            raise ValueError(f'Unknown {backbone} arch {arch!r}; valid '
                             f'names: {sorted(arch_zoo)}, or a dict with '
                             f'the keys {sorted(required)}.')
        settings = copy.deepcopy(arch_zoo[arch])
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
    stages with :meth:`agent_attention` and :meth:`make_blocks`, and say
    what ``frozen_stages`` freezes.

    Every setting is validated at construction: a bad one raises a
    ``ValueError`` naming it, its value, the allowed range and a fix. An
    empty batch gives empty outputs ``(0, C_i, H_i, W_i)``.

    Args:
        arch: A name of :attr:`arch_zoo` or a dict with all its keys.
        overrides: Per-stage settings overriding the arch (None: keep).
        in_channels: Image channels.
        out_indices: Stages whose outputs are returned.
        qkv_bias: Bias in the attention projections.
        drop_rate: Dropout in the MLPs and after the attention projections.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth, rising linearly to this value.
        frozen_stages: Stages to freeze (parameters fixed, eval mode kept
            across ``train()``); -1 freezes nothing, 0 only the first patch
            embedding, k the first k stages.
        with_cp: Gradient checkpointing of each block.
        attn_impl: ``'fast'`` or ``'reference'`` agent attention.
        bias_cache_size: Input shapes whose bias maps each agent attention
            keeps in eval mode (0: none); see :class:`AgentAttention`.
        pretrained: Deprecated, use ``init_cfg``.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads the
            authors' ImageNet or downstream checkpoints, or plain Swin / PVT
            ImageNet ones.
    """
    arch_zoo: Dict[str, dict] = {}
    stage_lists: Tuple[str, ...] = ()

    def __init__(self,
                 arch: Any,
                 overrides: Dict[str, Any],
                 in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 attn_impl: str = 'fast',
                 bias_cache_size: int = BIAS_CACHE_SIZE,
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
            fix='-1 freezes nothing, 0 only the first patch embedding, k '
            'the first k stages.')
        check_backbone_settings(name, in_channels, drop_rate, attn_drop_rate,
                                drop_path_rate)
        self.arch_settings = resolve_arch(name, self.arch_zoo, arch, overrides)
        check_stage_lists(name, NUM_STAGES, self.arch_settings,
                          self.stage_lists)
        self.out_indices = check_out_indices(name, out_indices, NUM_STAGES)
        self.in_channels = in_channels
        self.frozen_stages = frozen_stages
        self.with_cp = with_cp
        self.drop_rate = drop_rate
        self.drop_path_rates = linear_drop_path_rates(
            self.arch_settings['depths'], drop_path_rate)
        # what every token mixer takes, and what agent attention adds
        self.mixer_cfg = dict(
            qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate)
        self.agent_cfg = dict(
            attn_impl=attn_impl, bias_cache_size=bias_cache_size)

    def agent_attention(self, stage: int, embed_dims: int,
                        pretrain_grid: Tuple[int, int],
                        **kwargs: Any) -> AgentAttention:
        """The agent attention of a block of ``stage``: heads and agents
        from the arch settings, the backbone's mixer options, ``kwargs``
        (e.g. ``fused_qkv``)."""
        settings = self.arch_settings
        return AgentAttention(
            embed_dims,
            settings['num_heads'][stage],
            pretrain_grid=pretrain_grid,
            agent_num=settings['agent_num'][stage],
            agent_shape=tuple(settings['agent_shapes'][stage]),
            **self.mixer_cfg,
            **self.agent_cfg,
            **kwargs)

    def make_blocks(self,
                    stage: int,
                    embed_dims: int,
                    mixer: Callable[[int], nn.Module],
                    mlp_ratio: float,
                    norm_cfg: Optional[dict] = None) -> nn.ModuleList:
        """The blocks of ``stage``; ``mixer(j)`` builds the token mixer of
        block ``j``."""
        return nn.ModuleList(
            TransformerBlock(
                embed_dims,
                mixer(j),
                mlp_ratio,
                drop_rate=self.drop_rate,
                drop_path_rate=rate,
                with_cp=self.with_cp,
                norm_cfg=norm_cfg)
            for j, rate in enumerate(self.drop_path_rates[stage]))

    def check_input(self, img: Tensor) -> None:
        """Reject images the backbone cannot process, saying why."""
        check_input(type(self).__name__, img, self.in_channels, MIN_INPUT_SIZE)

    def frozen_modules(self) -> List[Optional[nn.Module]]:
        """Modules that ``frozen_stages`` freezes (per backbone)."""
        raise NotImplementedError

    def frozen_params(self) -> List[Optional[nn.Parameter]]:
        """Loose parameters that ``frozen_stages`` freezes (per backbone)."""
        return []

    def train(self, mode: bool = True) -> 'AgentBackbone':
        """Set the train mode, keeping frozen stages in eval mode."""
        super().train(mode)
        freeze(self.frozen_modules(), self.frozen_params())
        return self

    def init_weights(self) -> None:
        """Random init, or a checkpoint via ``init_cfg``."""
        if self.init_cfg is not None and self.init_cfg.get(
                'type') == 'Pretrained':
            load_backbone_checkpoint(self, self.init_cfg['checkpoint'])
            self._is_init = True
            return
        if self.init_cfg is None:
            self.apply(_init_layer)
            self._is_init = True
            return
        super().init_weights()


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
