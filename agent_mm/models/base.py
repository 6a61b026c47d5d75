"""What both agent backbones share: init, pretrained loading, freezing."""
import warnings
from typing import List, Optional

import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.model.weight_init import constant_init, trunc_normal_init

from .checkpoint import load_backbone_checkpoint
from .layers import check_int_range, freeze

NUM_STAGES = 4  # of both backbones


class AgentBackbone(BaseModule):
    """Base of :class:`AgentPVT` and :class:`AgentSwinTransformer`.

    Every setting is validated at construction: a bad one raises a
    ``ValueError`` naming it, its value, the allowed range and a fix. An
    empty batch gives empty outputs ``(0, C_i, H_i, W_i)``.

    Args:
        frozen_stages: Stages to freeze (parameters fixed, eval mode kept
            across ``train()``); -1 freezes nothing, 0 only the first patch
            embedding, k the first k stages.
        pretrained: Deprecated, use ``init_cfg``.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads the
            authors' ImageNet or downstream checkpoints.
    """

    def __init__(self,
                 frozen_stages: int = -1,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[dict] = None):
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('Set init_cfg=dict(type="Pretrained", '
                                 'checkpoint=...) or pretrained, not both.')
            warnings.warn(
                'DeprecationWarning: pretrained is deprecated, please use '
                '"init_cfg=dict(type=\'Pretrained\', checkpoint=...)" '
                'instead')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        check_int_range(
            type(self).__name__,
            'frozen_stages',
            frozen_stages,
            -1,
            NUM_STAGES,
            fix='-1 freezes nothing, 0 only the first patch embedding, k '
            'the first k stages.')
        self.frozen_stages = frozen_stages

    def frozen_modules(self) -> List[Optional[nn.Module]]:
        """Modules that ``frozen_stages`` freezes (per backbone)."""
        raise NotImplementedError

    def frozen_params(self) -> List[Optional[nn.Parameter]]:
        """Loose parameters that ``frozen_stages`` freezes (per backbone)."""
        return []

    def _freeze_stages(self) -> None:
        freeze(self.frozen_modules(), self.frozen_params())

    def train(self, mode: bool = True) -> 'AgentBackbone':
        """Set the train mode, keeping frozen stages in eval mode."""
        super().train(mode)
        self._freeze_stages()
        return self

    def init_weights(self) -> None:
        """Random init, or the authors' checkpoint via ``init_cfg``."""
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


def _init_layer(module: nn.Module) -> None:
    """Default init of the released models (PVT v1 / Swin style): linear
    layers truncated normal, norms identity; convolutions keep PyTorch's
    default init."""
    if isinstance(module, nn.Linear):
        trunc_normal_init(module, std=.02, bias=0.)
    elif isinstance(module, nn.LayerNorm):
        constant_init(module, val=1., bias=0.)
