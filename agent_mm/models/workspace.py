"""Memory shared by the large temporaries of an inference forward.

Some tensors of agent attention live only for its module's forward in
inference: the query/key/value projections, and the bias maps that the
:class:`~.bias_cache.BiasCache` does not keep (a shape seen for the first
time, or the cache turned off). Allocated per module, each is a large block
that the C allocator takes fresh from the kernel and returns on free (glibc
does so above 32 MB), so writing it pays a page fault for every page,
several times the cost of computing it. Within :func:`reuses_memory` (a
backbone's forward) the modules write them into buffers that later modules
reuse, and the buffers are freed when the forward returns: nothing is held
afterwards.
"""
import functools
import math
import threading
from typing import Callable, Dict, Optional, Sequence, TypeVar

import torch
from torch import Tensor

from .tracing import tracing

_workspace = threading.local()
Fn = TypeVar('Fn', bound=Callable)


def reuses_memory(forward: Fn) -> Fn:
    """Run ``forward`` with a workspace (:func:`workspace_buffer`) open,
    unless one is open already or a graph is being traced."""

    @functools.wraps(forward)
    def with_workspace(*args, **kwargs):
        if tracing() or _buffers() is not None:
            return forward(*args, **kwargs)
        _workspace.buffers = {}
        try:
            return forward(*args, **kwargs)
        finally:
            _workspace.buffers = None

    return with_workspace


def _buffers() -> Optional[Dict[str, Tensor]]:
    return getattr(_workspace, 'buffers', None)


def workspace_buffer(slot: str, shape: Sequence[int], dtype: torch.dtype,
                     device: torch.device) -> Optional[Tensor]:
    """An uninitialised ``shape`` tensor in the workspace's buffer ``slot``
    (valid until the next request of that slot), or None outside a
    workspace. The buffer grows to the largest request; a request of
    another dtype or device replaces it."""
    buffers = _buffers()
    if buffers is None:
        return None
    numel = math.prod(shape)
    buffer = buffers.get(slot)
    if (buffer is None or buffer.numel() < numel or buffer.dtype != dtype
            or buffer.device != device):
        buffers.pop(slot, None)  # free the old buffer before allocating
        buffer = buffers[slot] = torch.empty(numel, dtype=dtype,
                                             device=device)
    return buffer[:numel].view(shape)
