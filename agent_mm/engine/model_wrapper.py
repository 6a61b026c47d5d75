"""Distributed data parallel for CPU processes."""
import torch.nn as nn
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """:class:`MMDistributedDataParallel` for CPU processes (gloo).

    mmengine's runner passes ``device_ids=[LOCAL_RANK]``, which torch only
    accepts for GPU modules; CPU modules must be given none.
    """

    def __init__(self, module: nn.Module, device_ids=None, **kwargs):
        super().__init__(module=module, device_ids=None, **kwargs)
