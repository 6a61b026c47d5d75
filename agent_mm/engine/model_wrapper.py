"""Distributed data parallel for CPU processes, and the model a runner's
wrapper holds."""
from typing import List, Optional

import torch.nn as nn
from mmengine.model import MMDistributedDataParallel, is_model_wrapper
from mmengine.registry import MODEL_WRAPPERS
from mmengine.runner import Runner


def runner_model(runner: Runner) -> nn.Module:
    """The model a runner trains or tests, without its wrapper (DDP, ...)."""
    model = runner.model
    return model.module if is_model_wrapper(model) else model


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """:class:`MMDistributedDataParallel` for CPU processes (gloo).

    mmengine's runner passes ``device_ids=[LOCAL_RANK]``, which torch only
    accepts for GPU modules; CPU modules must be given none.
    """

    def __init__(self,
                 module: nn.Module,
                 device_ids: Optional[List[int]] = None,
                 **kwargs) -> None:
        super().__init__(module=module, device_ids=None, **kwargs)
