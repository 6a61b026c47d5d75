"""Mixed precision on the CPU."""
import logging
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from ..utils.cpu_features import AMX_FP16, AMX_TILE, AVX512_BF16, cpu_supports

CPU_AMP_DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16}
# the dtype name that turns autocast off (e.g. ``--cfg-options
# optim_wrapper.dtype=float32`` on a config that trains in bfloat16)
FLOAT32 = 'float32'

# the private torch.cpu probes that tell whether products of a dtype run in
# hardware (absent in older torch: then the answer is no)
NATIVE_PROBES = {
    torch.bfloat16: (AVX512_BF16, AMX_TILE),
    torch.float16: (AMX_FP16, ),
}


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` in hardware (bfloat16:
    AVX512-BF16 or AMX; float16: AMX-FP16). Elsewhere autocast to it
    emulates the products and is slower than float32."""
    return any(map(cpu_supports, NATIVE_PROBES.get(dtype, ())))


def autocast_dtype(name: str, owner: str) -> Optional[torch.dtype]:
    """The autocast dtype named ``name``, or None (float32, no autocast)
    for ``'float32'``.

    Raises:
        ValueError: ``name`` is neither an autocast dtype nor
            ``'float32'``.
    """
    if name == FLOAT32:
        return None
    if name not in CPU_AMP_DTYPES:
        raise ValueError(
            f'{owner} dtype must be one of '
            f'{sorted(CPU_AMP_DTYPES) + [FLOAT32]}, got {name!r} '
            f"('{FLOAT32}' turns autocast off).")
    return CPU_AMP_DTYPES[name]


def cpu_autocast_dtype(name: str, native_only: bool,
                       owner: str) -> Optional[torch.dtype]:
    """:func:`autocast_dtype` on the CPU: None (float32) also when
    ``native_only`` and this CPU lacks ``name`` in hardware (logged once);
    without ``native_only`` such a CPU emulates it, which is logged as a
    warning (on an AVX2-only AMD EPYC, Agent-PVT-T took 4.9–6.3× the
    float32 time in eval, 12× in training; docs/benchmark/precision.md).
    """
    dtype = autocast_dtype(name, owner)
    if dtype is None or cpu_has_native(dtype):
        return dtype
    if native_only:
        print_log(
            f'{owner}: this CPU has no native {name}, running in float32 '
            '(native_only=True).',
            logger='current')
        return None
    print_log(
        f'{owner}: this CPU has no native {name} (AVX512-BF16 or AMX for '
        f'bfloat16, AMX-FP16 for float16): autocast emulates it and runs '
        f'several times slower than float32. Set native_only=True to run '
        f"in float32 on such CPUs, or dtype='{FLOAT32}'.",
        logger='current',
        level=logging.WARNING)
    return dtype


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """Runs the forward pass under ``torch.autocast('cpu')``.

    mmengine's ``AmpOptimWrapper`` requires a GPU/NPU/MLU/MUSA device. On the
    CPU, bfloat16 has float32's exponent range, so no gradient scaling is
    needed; float16 has not (small gradients would underflow to zero), so
    its loss is scaled dynamically (``torch.amp.GradScaler``, in
    :attr:`loss_scaler`, saved with the optimizer state). Parameters and
    optimizer state stay in float32.

    Args:
        dtype: ``'bfloat16'`` (default), ``'float16'``, or ``'float32'``
            (no autocast).
        native_only: Train in float32 on a CPU without native ``dtype``
            products (:func:`cpu_has_native`), where autocast is slower.
        **kwargs: Arguments of :class:`mmengine.optim.OptimWrapper`.
    """

    def __init__(self,
                 dtype: str = 'bfloat16',
                 native_only: bool = False,
                 **kwargs) -> None:
        cast_dtype = cpu_autocast_dtype(dtype, native_only,
                                        'CPUAmpOptimWrapper')
        super().__init__(**kwargs)
        self.cast_dtype = cast_dtype
        self.loss_scaler = torch.amp.GradScaler(
            'cpu', enabled=cast_dtype == torch.float16)

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """Backward of the (scaled, in float16) loss."""
        super().backward(self.loss_scaler.scale(loss), **kwargs)

    def step(self, **kwargs) -> None:
        """Gradient clipping on the unscaled gradients, then a step unless
        they overflowed (float16), and the scale's update."""
        if self.clip_grad_kwargs:
            self.loss_scaler.unscale_(self.optimizer)
            self._clip_grad()
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update()

    def state_dict(self) -> dict:
        """The optimizer's state, and the loss scale in float16."""
        state = super().state_dict()
        if self.loss_scaler.is_enabled():
            state['loss_scaler'] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """:meth:`state_dict`'s inverse (a saved loss scale is read only in
        float16)."""
        state_dict = dict(state_dict)
        scaler_state = state_dict.pop('loss_scaler', None)
        if scaler_state is not None and self.loss_scaler.is_enabled():
            self.loss_scaler.load_state_dict(scaler_state)
        super().load_state_dict(state_dict)

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        with super().optim_context(model), torch.autocast(
                'cpu',
                dtype=self.cast_dtype or torch.bfloat16,
                enabled=self.cast_dtype is not None):
            yield
