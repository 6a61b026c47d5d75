"""Every op of a CPU eval forward timed inside the forward and again
alone.

A forward can be slower than its kernels: its ops may find their inputs
out of the caches, or write into pages the process has just been given.
Here every ``aten`` op of one warm forward is timed as it runs (a
``TorchDispatchMode`` times each call), then, in a second forward, each op
is also re-run alone just before it runs: on a copy of its arguments (whole
storages copied, so views keep their strides), once untimed, then timed
``repeats`` times (the median). Where a family's two times agree, the
forward runs its ops at the kernels' own speed at these shapes: only fewer
operations or faster kernels make it faster.

The two forwards are matched op by op (a warm eval forward dispatches the
same sequence; a mismatch raises). Both sides are timed the same way, by
``time.perf_counter`` around the op's call. An op's time includes the ops
its kernel calls (a fused kernel's own copies count as the kernel).
"""
import statistics
import time
from typing import Any, Callable, List, NamedTuple

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from agent_mm.utils.timing import timed

CPU = torch.device('cpu')


class OpTime(NamedTuple):
    """One op of the forward.

    Attributes:
        name: ``namespace::op``, e.g. ``'aten::addmm'``.
        in_forward_s: Its wall time in the forward.
        alone_s: Its median wall time re-run alone.
    """
    name: str
    in_forward_s: float
    alone_s: float


def op_name(func: torch._ops.OpOverload) -> str:
    """``'aten::addmm'`` for ``aten.addmm.out`` (the overload dropped)."""
    return func.name().split('.')[0]


def copy_argument(value: Any) -> Any:
    """A tensor copied with its whole storage, so that a view keeps its
    offset and strides (and a kernel sees the layout it saw); anything else
    as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    storage = value.untyped_storage()
    copy = torch.UntypedStorage(storage.nbytes(), device=value.device)
    copy.copy_(storage)
    tensor = value.new_empty(0)
    return tensor.set_(copy, value.storage_offset(), value.size(),
                       value.stride())


def time_alone(func: Callable, args: tuple, kwargs: dict,
               repeats: int) -> float:
    """Median seconds of ``func`` on copies of its arguments (in-place ops
    write into the copies), after one untimed call."""
    args, kwargs = tree_map(copy_argument, (args, kwargs))

    def call():
        return func(*args, **kwargs)

    call()
    return statistics.median(timed(call, CPU) for _ in range(repeats))


class TimedOps(TorchDispatchMode):
    """Run every op, recording its name and wall time; with ``repeats``,
    also re-run it alone first (:func:`time_alone`) and record that time
    instead."""

    def __init__(self, repeats: int = 0):
        super().__init__()
        self.repeats = repeats
        self.names: List[str] = []
        self.seconds: List[float] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.names.append(op_name(func))
        if self.repeats:
            self.seconds.append(time_alone(func, args, kwargs, self.repeats))
            return func(*args, **kwargs)
        start = time.perf_counter()
        result = func(*args, **kwargs)
        self.seconds.append(time.perf_counter() - start)
        return result


def op_times(model: nn.Module, inputs: torch.Tensor,
             repeats: int = 3) -> List[OpTime]:
    """Each op of an eval forward of ``model`` (warm: call it first), in
    the forward and alone.

    Args:
        model: The model, in eval mode and in its precision.
        inputs: Its input batch.
        repeats: Timed re-runs of each op alone.

    Returns:
        The ops in the order dispatched.

    Raises:
        RuntimeError: If the two forwards dispatch different ops (a
            forward that changes between calls cannot be matched).
    """
    in_forward, alone = TimedOps(), TimedOps(repeats)
    with torch.no_grad():
        for mode in (in_forward, alone):
            with mode:
                model(inputs)
    if in_forward.names != alone.names:
        raise RuntimeError(
            'the two forwards dispatched different ops '
            f'({len(in_forward.names)} and {len(alone.names)}): time a '
            'warm model whose forward repeats itself')
    return [
        OpTime(*op)
        for op in zip(in_forward.names, in_forward.seconds, alone.seconds)
    ]
