"""Agent attention as a plug-in for convolutional backbones.

:class:`AgentAttention2d` wraps :class:`AgentAttention` for feature maps:
it adds global agent attention, as a residual branch, to any layer of a CNN.
It is registered in mmengine's root ``MODELS`` registry, so mmcv's
``build_plugin_layer`` and the ``plugins`` of mmdet's and mmseg's ResNet /
ResNeXt build it like mmcv's ``ContextBlock`` or ``GeneralizedAttention``::

    plugins=[
        dict(cfg=dict(type='AgentAttention2d'),
             stages=(False, True, True, True),
             position='after_conv2')
    ]
"""
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch import Tensor

from .agent_attention import AgentAttention
from .checks import check_choice, check_finite, check_int_range
from .layers import map_to_tokens, tokens_to_map

DATA_FORMATS = ('NCHW', 'NHWC')
# channels per head when the number of heads is chosen for the user
HEAD_DIMS = 64


def default_num_heads(channels: int) -> int:
    """The largest divisor of ``channels`` not above ``channels // 64``
    (heads of about 64 channels), and at least 1."""
    most = max(1, channels // HEAD_DIMS)
    return max(heads for heads in range(1, most + 1) if channels % heads == 0)


@MODELS.register_module()
class AgentAttention2d(BaseModule):
    """Agent attention over a feature map, as a residual plug-in.

    ``out = x + gamma * attn(norm(x))``, where every position of the map is
    a token, ``norm`` is a ``LayerNorm`` over the channels of each position,
    ``attn`` is :class:`AgentAttention` (its fast path; position biases
    resized to any ``H×W``, so every map of at least 1×1 works) and
    ``gamma`` is a learned per-channel scale. ``gamma`` starts at
    ``layer_scale_init_value``, 0 by default: the block is then the
    identity, so a network plugged into keeps its pretrained (e.g.
    ImageNet) behaviour at the start of training, as with mmcv's
    ``GeneralizedAttention``, whose scalar ``gamma`` also starts at 0.

    Args:
        in_channels: Channels ``C`` of the map (passed by mmcv's
            ``build_plugin_layer`` and by ResNet's ``plugins``).
        num_heads: Number of heads, a divisor of ``in_channels``. Default:
            the largest divisor not above ``in_channels // 64``, at least 1
            (e.g. 2, 4, 8 heads for the 128, 256, 512 channels of a
            ResNet-50's stages c3-c5 after ``conv2``).
        agent_num: Number of learned bias agents, a square ``p*p``.
        agent_shape: Agent grid ``(a_h, a_w)``: the queries are pooled to
            this many agent tokens.
        pretrain_grid: Grid ``(r_h, r_w)`` of the row and column position
            biases, resized to the map (default: a 224×224 image at stride
            16).
        layer_scale_init_value: Initial value of ``gamma``.
        data_format: ``'NCHW'`` for ``(B, C, H, W)`` maps (PyTorch,
            OpenMMLab), ``'NHWC'`` for ``(B, H, W, C)`` maps (channels-last
            frameworks); the output has the input's layout.
        init_cfg: mmengine initialisation config.
    """

    _abbr_ = 'agent_attention_block'

    def __init__(self,
                 in_channels: int,
                 num_heads: Optional[int] = None,
                 agent_num: int = 49,
                 agent_shape: Tuple[int, int] = (7, 7),
                 pretrain_grid: Tuple[int, int] = (14, 14),
                 layer_scale_init_value: float = 0.,
                 data_format: str = 'NCHW',
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        self._check_settings(in_channels, layer_scale_init_value, data_format)
        self.in_channels = in_channels
        self.data_format = data_format
        self.norm = nn.LayerNorm(in_channels, eps=1e-6)
        self.attn = AgentAttention(
            in_channels,
            default_num_heads(in_channels) if num_heads is None else num_heads,
            pretrain_grid=pretrain_grid,
            agent_num=agent_num,
            agent_shape=agent_shape,
            fused_qkv=True)
        self.gamma = nn.Parameter(
            torch.full((in_channels, ), float(layer_scale_init_value)))

    @staticmethod
    def _check_settings(in_channels: Any, layer_scale_init_value: Any,
                        data_format: Any) -> None:
        """Raise a ``ValueError`` naming the first invalid argument (those
        of the attention are checked by :class:`AgentAttention`)."""
        owner = 'AgentAttention2d'
        check_int_range(
            owner,
            'in_channels',
            in_channels,
            1,
            fix='Give the channels of the feature map.')
        check_finite(owner, 'layer_scale_init_value', layer_scale_init_value,
                     '0 starts the block as the identity.')
        check_choice(owner, 'data_format', data_format, DATA_FORMATS,
                     "'NCHW' for mmdet / mmseg feature maps, 'NHWC' for "
                     'channels-last ones.')

    def _grid(self, x: Tensor) -> Tuple[int, int]:
        """``(H, W)`` of ``x``, after checking its shape."""
        nchw = self.data_format == 'NCHW'
        if x.dim() == 4 and x.shape[1 if nchw else 3] == self.in_channels:
            return tuple(x.shape[2:] if nchw else x.shape[1:3])
        layout = '(B, C, H, W)' if nchw else '(B, H, W, C)'
        raise ValueError(f'AgentAttention2d (data_format={self.data_format!r}'
                         f') expects a {layout} map with C='
                         f'{self.in_channels}, got shape {tuple(x.shape)}.')

    def forward(self, x: Tensor) -> Tensor:
        """``x + gamma * attn(norm(x))`` of a map in ``data_format``."""
        hw_shape = self._grid(x)
        if self.data_format == 'NCHW':
            branch = self.attn(self.norm(map_to_tokens(x)), hw_shape)
            return torch.addcmul(x, self.gamma.view(-1, 1, 1),
                                 tokens_to_map(branch, hw_shape))
        branch = self.attn(self.norm(x.flatten(1, 2)), hw_shape)
        return torch.addcmul(x, self.gamma, branch.unflatten(1, hw_shape))
