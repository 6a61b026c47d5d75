"""The benchmarked backbones, the input sizes and the precisions they run
at.

Every agent backbone comes with its reference-path twin (same weights, the
literal attention path) and the mmdet backbone it is compared with. A model
runs in float32 as built, or in a lower precision under ``torch.autocast``
with its parameters left in float32 (see :func:`in_precision`).
"""
from functools import partial
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from agent_mm.models import AgentPVT, AgentSwinTransformer

Size = Tuple[int, int]

FLOAT32 = 'float32'
# the precisions a model can run in, by the name used in the results
DTYPES: Dict[str, torch.dtype] = {
    FLOAT32: torch.float32,
    'bfloat16': torch.bfloat16,
    'float16': torch.float16,
}

# Backbone settings of mmdet's configs/pvt/retinanet_pvt-{t,s}_fpn_1x_coco.py
# and configs/swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py.
MMDET_PVT_T = dict(num_layers=[2, 2, 2, 2])
MMDET_PVT_S = dict(num_layers=[3, 4, 6, 3])
MMDET_SWIN_T = dict(
    embed_dims=96,
    depths=[2, 2, 6, 2],
    num_heads=[3, 6, 12, 24],
    window_size=7,
    mlp_ratio=4,
    qkv_bias=True,
    qk_scale=None,
    drop_rate=0.,
    attn_drop_rate=0.,
    drop_path_rate=0.2,
    patch_norm=True,
    out_indices=(0, 1, 2, 3),
    with_cp=False,
    convert_weights=True)


class ModelSpec(NamedTuple):
    """A benchmarked backbone.

    Attributes:
        label: Name in tables and plots.
        build: Builds the backbone (random weights).
        reference_of: For a reference-path model, the key of the fast model
            whose weights it copies; its fast/reference ratio is reported.
        baseline: For an agent model, the key of the mmdet model it is
            compared with.
    """
    label: str
    build: Callable[[], nn.Module]
    reference_of: Optional[str] = None
    baseline: Optional[str] = None


def mmdet_backbone(name: str, **kwargs) -> nn.Module:
    """Build mmdet's backbone class ``name`` (imported lazily).

    Args:
        name: Class name in ``mmdet.models.backbones``.
        **kwargs: Arguments of the class.

    Returns:
        The backbone, with random weights.
    """
    from mmdet.models import backbones
    return getattr(backbones, name)(**kwargs)


def _trio(key: str, label: str, agent: Callable[..., nn.Module],
          baseline_key: str, baseline_label: str,
          baseline: Callable[[], nn.Module]) -> Dict[str, ModelSpec]:
    """An agent backbone, its reference-path twin and its mmdet baseline."""
    return {
        key:
        ModelSpec(label, agent, baseline=baseline_key),
        f'{key}_ref':
        ModelSpec(f'{label} (reference)',
                  partial(agent, attn_impl='reference'),
                  reference_of=key),
        baseline_key:
        ModelSpec(baseline_label, baseline),
    }


MODELS: Dict[str, ModelSpec] = {
    **_trio('agent_pvt_t', 'Agent-PVT-T', partial(AgentPVT, arch='tiny'),
            'pvt_t', 'PVT-T (mmdet)',
            partial(mmdet_backbone, 'PyramidVisionTransformer',
                    **MMDET_PVT_T)),
    'agent_pvt_t_nocache':
    ModelSpec('Agent-PVT-T (bias cache off)',
              partial(AgentPVT, arch='tiny', bias_cache_size=0)),
    **_trio('agent_pvt_s', 'Agent-PVT-S', partial(AgentPVT, arch='small'),
            'pvt_s', 'PVT-S (mmdet)',
            partial(mmdet_backbone, 'PyramidVisionTransformer',
                    **MMDET_PVT_S)),
    **_trio('agent_swin_t', 'Agent-Swin-T',
            partial(AgentSwinTransformer, arch='tiny'), 'swin_t',
            'Swin-T (mmdet)',
            partial(mmdet_backbone, 'SwinTransformer', **MMDET_SWIN_T)),
}


def reference_twin(key: str) -> Optional[str]:
    """The key of the reference-path twin of model ``key``, if it has one."""
    return next(
        (other for other, spec in MODELS.items() if spec.reference_of == key),
        None)


def token_count(size: Sequence[int]) -> int:
    """Tokens of the stride-4 patch grid of an ``(H, W)`` input: H·W/16."""
    return size[0] * size[1] // 16


def size_text(size: Sequence[int]) -> str:
    """``(800, 1333)`` → ``'800×1333'``."""
    return f'{size[0]}×{size[1]}'


def build_models(keys: Sequence[str],
                 device: torch.device) -> Dict[str, nn.Module]:
    """Build the models of :data:`MODELS` named by ``keys``.

    A reference-path model gets the weights of its fast twin when the twin
    is built before it.

    Args:
        keys: Keys of :data:`MODELS`, in the order of the run.
        device: Where the models go.

    Returns:
        The models by key.
    """
    models = {}
    for key in keys:
        model = MODELS[key].build()
        twin = MODELS[key].reference_of
        if twin in models:
            model.load_state_dict(models[twin].state_dict())
        models[key] = model.to(device)
    return models


def parameter_counts(models: Dict[str, nn.Module]) -> Dict[str, int]:
    """The number of parameters of each model."""
    return {
        key: sum(p.numel() for p in model.parameters())
        for key, model in models.items()
    }


def within_limits(models: Dict[str, nn.Module], size: Size,
                  limits: Dict[str, int]) -> Dict[str, nn.Module]:
    """The models allowed to run at ``size``.

    Args:
        models: Models by key.
        size: Input size ``(H, W)``.
        limits: The largest number of tokens (see :func:`token_count`) a
            model may run at, by key; models without a limit always run.

    Returns:
        The models of ``models`` whose limit allows ``size``.
    """
    tokens = token_count(size)
    return {
        key: model
        for key, model in models.items() if tokens <= limits.get(key, tokens)
    }


def check_dtypes(names: Sequence[str]) -> None:
    """Check that ``names`` are one or more distinct keys of :data:`DTYPES`.

    Raises:
        ValueError: Naming the first unknown value and the choices, or the
            repeated ones.
    """
    choices = ', '.join(DTYPES)
    for name in names:
        if name not in DTYPES:
            raise ValueError(
                f'unknown dtype {name!r}: choose from {choices}')
    if not names or len(set(names)) < len(names):
        raise ValueError('dtypes must be one or more distinct values of '
                         f'{choices}, got {list(names)}')


class Autocast(nn.Module):
    """A model whose forward runs under ``torch.autocast``.

    The parameters stay in float32; a backward of the outputs runs outside
    the autocast region, as recommended.

    Args:
        model: The wrapped model.
        dtype: The autocast dtype.
        device_type: The autocast device, e.g. ``'cpu'``.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype,
                 device_type: str):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.device_type = device_type

    def forward(self, inputs: Tensor) -> Tuple[Tensor, ...]:
        """The model's outputs for ``inputs``, computed under autocast."""
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(inputs)


def in_precision(model: nn.Module, dtype: str,
                 device: torch.device) -> nn.Module:
    """``model`` run in precision ``dtype`` (a key of :data:`DTYPES`):
    itself for float32, else wrapped in :class:`Autocast`."""
    if dtype == FLOAT32:
        return model
    return Autocast(model, DTYPES[dtype], device.type)
