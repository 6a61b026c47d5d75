"""Timing and peak-memory measurement of model calls, for the analysis tools.

A *step* is a callable that runs one call of a model (see :func:`eval_step`
and :func:`train_step`). :func:`interleaved_calls` times several steps
round-robin so that load from other processes hits all of them alike, and
counts the memory each timed call faults in (:class:`Call`);
:func:`peak_bytes` reports the largest amount of tensor memory a step
allocates on top of what was live before it: on CUDA from
``torch.cuda.max_memory_allocated``, on the CPU by replaying the allocation
and free events that ``torch.profiler`` records for torch's CPU allocator
(memory allocated outside it, such as oneDNN scratchpads, is not seen).
"""
import mmap
import time
from typing import (Callable, Dict, Hashable, List, NamedTuple, Optional,
                    Sequence, Tuple, TypeVar)

import torch
import torch.nn as nn
from torch import Tensor

try:  # Unix only
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

Step = Callable[[], None]
# what names a step in :func:`interleaved_times`, e.g. a model's key
Key = TypeVar('Key', bound=Hashable)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(step: Step, device: torch.device) -> float:
    """Wall time of one call, in seconds."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def page_faults() -> Optional[int]:
    """The process's minor page faults so far (all threads), or None where
    :mod:`resource` is missing (Windows)."""
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Call(NamedTuple):
    """One timed call.

    Attributes:
        seconds: Its wall time.
        faulted_bytes: Memory the kernel mapped into the process during it:
            its minor page faults (:func:`page_faults`) times the base page
            size, a lower bound where transparent huge pages fault in 2 MB
            at once; None where faults are not counted. Blocks that
            the C allocator returned to the kernel on free (glibc does above
            its mmap threshold, at most 32 MB, and when it trims its heap)
            fault in again page by page when next written, in system time
            that counts in ``seconds``.
    """
    seconds: float
    faulted_bytes: Optional[int]


def measured_call(step: Step, device: torch.device) -> Call:
    """One call of ``step``, timed, with the memory it faulted in."""
    before = page_faults()
    seconds = timed(step, device)
    if before is None:
        return Call(seconds, None)
    return Call(seconds, (page_faults() - before) * mmap.PAGESIZE)


def best_time(step: Step, device: torch.device, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``step``, after one
    untimed call (which warms caches and faults memory in)."""
    step()
    return min(timed(step, device) for _ in range(repeats))


def interleaved_calls(steps: Dict[Key, Step], warmup: int, repeats: int,
                      device: torch.device) -> Dict[Key, List[Call]]:
    """Time every step once per repeat, round-robin, each timed call right
    after ``warmup`` untimed calls of the same step (:func:`measured_call`).

    The order rotates each repeat, so no step always follows the same one.
    The untimed calls make the timed one warm, with the caches and the
    allocator's free memory as that step left them (after another model's
    call, the C allocator has returned its large blocks to the kernel, and
    their pages would fault in again). With ``warmup``, one untimed round
    of every step comes first, so that no timed call is among a step's
    first two: what a step prepares once (an agent backbone's bias cache
    keeps a shape's maps from its second forward, oneDNN builds its
    kernels at the first calls of a shape) is not in the timed calls.
    """
    keys = list(steps)
    calls: Dict[Key, List[Call]] = {key: [] for key in keys}
    if warmup:
        for key in keys:
            steps[key]()
    for repeat in range(repeats):
        shift = repeat % len(keys)
        for key in keys[shift:] + keys[:shift]:
            for _ in range(warmup):
                steps[key]()
            calls[key].append(measured_call(steps[key], device))
    return calls


def interleaved_times(steps: Dict[Key, Step], warmup: int, repeats: int,
                      device: torch.device) -> Dict[Key, List[float]]:
    """The seconds of :func:`interleaved_calls`."""
    return {
        key: [call.seconds for call in calls]
        for key, calls in interleaved_calls(steps, warmup, repeats,
                                            device).items()
    }


def replay_peak(events: Sequence[Tuple[int, int]]) -> int:
    """Peak of the running total of ``(time, bytes)`` alloc (+) / free (-)
    events, counted from zero."""
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def cpu_peak_bytes(step: Step) -> int:
    """Peak tensor memory allocated by ``step`` on the CPU (see the module
    docstring)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [(e.start_ns(), e.nbytes())
              for e in prof.profiler.kineto_results.events()
              if e.name() == '[memory]' and e.device_type() == DeviceType.CPU]
    return replay_peak(events)


def peak_bytes(step: Step, device: torch.device) -> int:
    """Peak memory of one call above the memory live before it."""
    if device.type != 'cuda':
        return cpu_peak_bytes(step)
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def eval_step(model: nn.Module, inputs: Tensor) -> Step:
    """A forward of ``inputs`` without autograd."""

    def step() -> None:
        with torch.no_grad():
            model(inputs)

    return step


def train_step(model: nn.Module, inputs: Tensor) -> Step:
    """Forward, then backward of the sum of all outputs; gradients are
    dropped first, so their allocation is part of every call."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        outputs = model(inputs)
        torch.stack([out.sum() for out in outputs]).sum().backward()

    return step
