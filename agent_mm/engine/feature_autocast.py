"""Mixed precision for the feature extractor only (backbone and neck).

mmcv's CPU kernels (NMS, RoIAlign, ...) accept float32 only, so autocasting
a whole detector on the CPU fails in its heads. The backbone and neck are
where the time goes; :class:`FeatureAutocastHook` runs the model's
``extract_feat`` under ``torch.autocast`` and hands float32 features to the
heads.
"""
import functools
from typing import Any, Callable

import torch
import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from .optim_wrapper import cpu_autocast_dtype


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


def autocast_features(model: nn.Module, dtype: torch.dtype,
                      device_type: str = 'cpu') -> None:
    """Make ``model.extract_feat`` run under autocast (idempotent).

    Raises:
        ValueError: The model has no ``extract_feat`` (mmdet detectors and
            mmseg segmentors have one).
    """
    if getattr(model, 'features_autocast', None) == (device_type, dtype):
        return
    if not hasattr(model, 'extract_feat'):
        raise ValueError(f'{type(model).__name__} has no extract_feat: '
                         'FeatureAutocastHook serves mmdet detectors and '
                         'mmseg segmentors.')
    plain = getattr(model, 'plain_extract_feat', model.extract_feat)
    model.plain_extract_feat = plain
    model.extract_feat = functools.partial(_autocast_call, plain,
                                           device_type, dtype)
    model.features_autocast = (device_type, dtype)


@HOOKS.register_module()
class FeatureAutocastHook(Hook):
    """Run the backbone and neck (``extract_feat``) in ``dtype`` under
    autocast, in training, validation and test; the heads stay in float32.

    Args:
        dtype: ``'bfloat16'`` (default; fast on CPUs with AVX512-BF16 or
            AMX), ``'float16'``, or ``'float32'`` (the hook does nothing).
        device_type: The autocast device, ``'cpu'`` or ``'cuda'``.
        native_only: On the CPU, do nothing where the CPU has no native
            ``dtype`` products (autocast would be slower than float32).
    """
    priority = 'VERY_HIGH'

    def __init__(self,
                 dtype: str = 'bfloat16',
                 device_type: str = 'cpu',
                 native_only: bool = False):
        self.dtype = cpu_autocast_dtype(
            dtype, native_only and device_type == 'cpu',
            'FeatureAutocastHook')
        self.device_type = device_type

    def _apply(self, runner) -> None:
        if self.dtype is None:
            return
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        autocast_features(model, self.dtype, self.device_type)

    def before_train(self, runner) -> None:
        self._apply(runner)

    def before_val(self, runner) -> None:
        self._apply(runner)

    def before_test(self, runner) -> None:
        self._apply(runner)
