"""Keep the memory a training step frees for the next step (glibc).

glibc's ``malloc`` gives freed memory back to the kernel once more than
``M_TRIM_THRESHOLD`` bytes lie free at the top of its heap, and serves
blocks above ``M_MMAP_THRESHOLD`` by fresh mappings that are unmapped when
freed. Both thresholds adapt to the largest block freed so far (up to 32
and 64 MB). A training step on the CPU frees most of its activations at
once after the backward pass, far more than that, so the heap is trimmed
and the next step faults the same memory back in, a page at a time and
zero-filled by the kernel. Fixing the thresholds keeps that memory in the
process, as PyTorch's caching allocator does on GPUs: the process holds
its peak instead of returning to it at every step.
"""
import ctypes
from typing import Callable, Optional

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

MB = 2**20
# mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# the largest mmap threshold glibc accepts on 64-bit systems; larger
# blocks are always mapped afresh
MMAP_THRESHOLD_MAX_MB = 32
# mallopt takes a C int
TRIM_THRESHOLD_MAX_MB = (2**31 - 1) // MB


def glibc_mallopt() -> Optional[Callable[[int, int], int]]:
    """glibc's ``mallopt``, or None where the C library is another one
    (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it
        return libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None


def check_thresholds(trim_threshold_mb: int, mmap_threshold_mb: int) -> None:
    """Raise a ``ValueError`` naming the valid range unless both thresholds
    are integers glibc accepts."""
    for name, value, low, high in (
        ('trim_threshold_mb', trim_threshold_mb, 0, TRIM_THRESHOLD_MAX_MB),
        ('mmap_threshold_mb', mmap_threshold_mb, 1, MMAP_THRESHOLD_MAX_MB),
    ):
        if not isinstance(value, int) or not low <= value <= high:
            raise ValueError(
                f'{name} must be a whole number of MB from {low} to {high} '
                f'(glibc limit), got {value!r}')


def keep_freed_memory(trim_threshold_mb: int = 1024,
                      mmap_threshold_mb: int = MMAP_THRESHOLD_MAX_MB) -> bool:
    """Fix glibc's heap thresholds for the rest of the process: up to
    ``trim_threshold_mb`` of freed memory stays in the heap for reuse, and
    blocks up to ``mmap_threshold_mb`` come from the heap.

    Returns:
        Whether the thresholds were set: False where the C library is not
        glibc (nothing is changed there).

    Raises:
        ValueError: A threshold outside what glibc accepts.
    """
    check_thresholds(trim_threshold_mb, mmap_threshold_mb)
    mallopt = glibc_mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold_mb * MB)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_threshold_mb * MB))


@HOOKS.register_module()
class KeepFreedMemoryHook(Hook):
    """Keep the memory each step frees in the process
    (:func:`keep_freed_memory`), from the start of the run to the end of the
    process; does nothing where the C library is not glibc.

    Worth it for CPU training at small batches, whose activations are
    blocks below glibc's 32 MB mmap limit: the next step reuses them instead
    of faulting fresh pages in (the detection quick-start: a few per cent of
    its time, docs/quickstart_tuning.md).

    Args:
        trim_threshold_mb: Freed memory the heap keeps, in MB.
        mmap_threshold_mb: Blocks up to this size come from the heap, in MB
            (at most 32).
    """
    priority = 'VERY_HIGH'

    def __init__(self,
                 trim_threshold_mb: int = 1024,
                 mmap_threshold_mb: int = MMAP_THRESHOLD_MAX_MB):
        check_thresholds(trim_threshold_mb, mmap_threshold_mb)
        self.trim_threshold_mb = trim_threshold_mb
        self.mmap_threshold_mb = mmap_threshold_mb

    def before_run(self, runner) -> None:
        if keep_freed_memory(self.trim_threshold_mb, self.mmap_threshold_mb):
            runner.logger.info(
                'KeepFreedMemoryHook: the heap keeps up to '
                f'{self.trim_threshold_mb} MB of freed memory, blocks up to '
                f'{self.mmap_threshold_mb} MB come from it')
        else:
            runner.logger.info('KeepFreedMemoryHook: the C library is not '
                               'glibc; its heap settings are left as they are')
