"""Mixed precision for the feature extractor and chosen heads.

mmcv's CPU kernels (NMS, RoIAlign, ...) accept float32 only, so autocasting
a whole detector on the CPU fails in its heads. The backbone and neck are
where most of the time goes; :class:`FeatureAutocastHook` runs the model's
``extract_feat`` under ``torch.autocast`` and hands float32 features to the
heads. Heads whose ``forward`` is plain convolutions and linear layers (the
RPN, box and mask heads of mmdet) can be named to run under autocast too.
"""
import functools
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from .model_wrapper import runner_model
from .optim_wrapper import autocast_dtype, cpu_autocast_dtype


def _to_float32(features: Any) -> Any:
    """Floating tensors of a (nested) tuple / list / dict as float32."""
    if isinstance(features, torch.Tensor):
        return features.float() if features.is_floating_point() else features
    if isinstance(features, (tuple, list)):
        return type(features)(_to_float32(f) for f in features)
    if isinstance(features, dict):
        return {k: _to_float32(v) for k, v in features.items()}
    return features


def _autocast_call(fn: Callable, device_type: str, dtype: torch.dtype,
                   *args: Any, **kwargs: Any) -> Any:
    with torch.autocast(device_type, dtype=dtype):
        features = fn(*args, **kwargs)
    return _to_float32(features)


def autocast_method(owner: nn.Module, name: str, dtype: torch.dtype,
                    device_type: str = 'cpu') -> None:
    """Make ``owner.<name>`` run under autocast and return float32.

    Idempotent; a second call with another precision replaces the first
    (``owner.autocast_methods`` maps each name to its undecorated method and
    settings).
    """
    wrapped = owner.__dict__.setdefault('autocast_methods', {})
    plain, *settings = wrapped.get(name, (getattr(owner, name), ))
    if settings == [device_type, dtype]:
        return
    setattr(owner, name,
            functools.partial(_autocast_call, plain, device_type, dtype))
    wrapped[name] = (plain, device_type, dtype)


def autocast_features(model: nn.Module, dtype: torch.dtype,
                      device_type: str = 'cpu') -> None:
    """Make ``model.extract_feat`` run under autocast (idempotent).

    Raises:
        ValueError: The model has no ``extract_feat`` (mmdet detectors and
            mmseg segmentors have one).
    """
    if not hasattr(model, 'extract_feat'):
        raise ValueError(f'{type(model).__name__} has no extract_feat: '
                         'FeatureAutocastHook serves mmdet detectors and '
                         'mmseg segmentors.')
    autocast_method(model, 'extract_feat', dtype, device_type)


def autocast_heads(model: nn.Module, heads: Sequence[str],
                   dtype: torch.dtype, device_type: str = 'cpu') -> None:
    """Make the ``forward`` of each named submodule run under autocast.

    Args:
        heads: Dotted submodule names, e.g. ``'roi_head.mask_head'``.

    Raises:
        ValueError: A name is not a submodule of ``model``.
    """
    for name in heads:
        try:
            head = model.get_submodule(name)
        except AttributeError:
            children = ', '.join(n for n, _ in model.named_children())
            raise ValueError(
                f'FeatureAutocastHook: {type(model).__name__} has no '
                f'submodule {name!r}; name heads by their dotted path from '
                f'the model (its children: {children}).') from None
        autocast_method(head, 'forward', dtype, device_type)


@HOOKS.register_module()
class FeatureAutocastHook(Hook):
    """Run the backbone and neck (``extract_feat``), and optionally some
    heads, in ``dtype`` under autocast, in training, validation and test;
    everything else stays in float32 and reads float32 outputs.

    Args:
        dtype: ``'bfloat16'`` (default; fast on CPUs with AVX512-BF16 or
            AMX), ``'float16'``, or ``'float32'`` (the hook does nothing).
        device_type: The autocast device, ``'cpu'`` or ``'cuda'``.
        native_only: On the CPU, do nothing where the CPU has no native
            ``dtype`` products (autocast would be slower than float32;
            without ``native_only`` it runs there, with a warning).
        heads: Dotted names of submodules whose ``forward`` also runs under
            autocast, e.g. ``('rpn_head', 'roi_head.bbox_head',
            'roi_head.mask_head')``. Name only modules whose ``forward``
            holds no float32-only op (mmdet's RoI extractors do: RoIAlign).
    """
    priority = 'VERY_HIGH'

    def __init__(self,
                 dtype: str = 'bfloat16',
                 device_type: str = 'cpu',
                 native_only: bool = False,
                 heads: Sequence[str] = ()) -> None:
        owner = 'FeatureAutocastHook'
        self.dtype = (
            cpu_autocast_dtype(dtype, native_only, owner)
            if device_type == 'cpu' else autocast_dtype(dtype, owner))
        self.device_type = device_type
        self.heads = tuple(heads)

    def _apply(self, runner: Runner) -> None:
        if self.dtype is None:
            return
        model = runner_model(runner)
        autocast_features(model, self.dtype, self.device_type)
        autocast_heads(model, self.heads, self.dtype, self.device_type)

    def before_train(self, runner: Runner) -> None:
        if self.dtype == torch.float16 and not scales_loss(
                runner.optim_wrapper):
            raise ValueError(
                'FeatureAutocastHook trains in float16 but the optim '
                'wrapper does not scale the loss, so small gradients would '
                "underflow to zero. Use dtype='bfloat16', or an optim "
                "wrapper that scales it (CPUAmpOptimWrapper with "
                "dtype='float16' on the CPU, AmpOptimWrapper on a GPU).")
        self._apply(runner)

    def before_val(self, runner: Runner) -> None:
        self._apply(runner)

    def before_test(self, runner: Runner) -> None:
        self._apply(runner)


def scales_loss(
        optim_wrapper: Union[OptimWrapper, OptimWrapperDict]) -> bool:
    """Whether ``optim_wrapper`` (mmengine's, or a dict of them) scales the
    loss before backward, as float16 training needs: an enabled
    ``loss_scaler`` (mmengine's ``AmpOptimWrapper``,
    :class:`~.optim_wrapper.CPUAmpOptimWrapper` in float16)."""
    wrappers = (optim_wrapper.values()
                if hasattr(optim_wrapper, 'values') else [optim_wrapper])
    for wrapper in wrappers:
        scaler = getattr(wrapper, 'loss_scaler', None)
        enabled = getattr(scaler, 'is_enabled', lambda: True)
        if scaler is None or not enabled():
            return False
    return True
