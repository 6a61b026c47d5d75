"""Mixed precision on the CPU."""
from contextlib import contextmanager

import torch
import torch.nn as nn
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

CPU_AMP_DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16}


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """Runs the forward pass under ``torch.autocast('cpu')``.

    mmengine's ``AmpOptimWrapper`` requires a GPU/NPU/MLU/MUSA device. On the
    CPU, bfloat16 has float32's exponent range, so no gradient scaling is
    needed; parameters and optimizer state stay in float32.

    Args:
        dtype: ``'bfloat16'`` (default) or ``'float16'``.
        **kwargs: Arguments of :class:`mmengine.optim.OptimWrapper`.
    """

    def __init__(self, dtype: str = 'bfloat16', **kwargs):
        if dtype not in CPU_AMP_DTYPES:
            raise ValueError(f'CPUAmpOptimWrapper dtype must be one of '
                             f'{sorted(CPU_AMP_DTYPES)}, got {dtype!r}.')
        super().__init__(**kwargs)
        self.cast_dtype = CPU_AMP_DTYPES[dtype]

    @contextmanager
    def optim_context(self, model: nn.Module):
        with super().optim_context(model), torch.autocast(
                'cpu', dtype=self.cast_dtype):
            yield
