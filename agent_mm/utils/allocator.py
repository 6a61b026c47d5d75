"""Keep the memory a process frees for its next allocations (glibc).

glibc's ``malloc`` serves large blocks by fresh mappings that it unmaps on
free, and gives the top of its heap back to the kernel once enough of it
lies free. An inference forward at high resolution frees most of its
activations before the next one allocates them again, so every forward
faults the same memory back in, a page at a time and zero-filled by the
kernel: Agent-PVT-T at 1024² faulted 30-40 K pages a forward, the authors'
code and mmdet's backbones far more (docs/benchmark/README.md, "Freed memory
kept by the tools"); a training step frees its activations after the
backward pass alike. :func:`keep_freed_memory` turns both off for the rest
of the process, as ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:...`` does at
start-up: the process then holds its peak instead of returning to it after
every forward or step, as PyTorch's caching allocator does on GPUs.
"""
import ctypes
import os
from typing import Callable, Optional

# mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# the most freed memory mallopt can keep at the top of the heap (a C int)
TRIM_THRESHOLD_MAX = 2**31 - 1
TUNABLES_ENV = 'GLIBC_TUNABLES'


def glibc_mallopt() -> Optional[Callable[[int, int], int]]:
    """glibc's ``mallopt``, or None where the C library is another one
    (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it
        return libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None


def malloc_tuned_by_user() -> bool:
    """Whether the environment already sets glibc's malloc tunables
    (``GLIBC_TUNABLES=glibc.malloc.…``), which are then left as they are."""
    return 'glibc.malloc.' in os.environ.get(TUNABLES_ENV, '')


def keep_freed_memory() -> bool:
    """Keep freed memory in the process from now on: no block is mapped
    afresh and up to 2 GB of freed memory stay at the top of the heap.

    The tools call it before they build the model (``tools/train.py``,
    ``tools/test.py``, ``tools/infer.py``): it gains most where the
    computation is fast next to the faults (high resolution, half precision,
    fast CPUs), and cost no time in any measurement (docs/benchmark/README.md,
    "Freed memory kept in training").

    Returns:
        Whether the setting was applied: False where the C library is not
        glibc, or where ``GLIBC_TUNABLES`` already tunes malloc (nothing is
        changed then).
    """
    mallopt = glibc_mallopt()
    if mallopt is None or malloc_tuned_by_user():
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX))
