"""glibc's heap keeping freed memory (agent_mm/utils/allocator.py)."""
import os
import subprocess
import sys

import pytest

from agent_mm.utils import allocator

glibc_only = pytest.mark.skipif(
    allocator.glibc_mallopt() is None, reason='mallopt is glibc only')

# allocates and frees a 64 MB tensor (above glibc's 32 MB mmap limit) five
# times after two warm-ups; prints whether the setting was applied and the
# median of the five allocations' faulted bytes (the median: a stray
# allocation of the interpreter's can leave one block where the heap cannot
# reuse it)
FAULTS_SCRIPT = '''
import statistics, sys, torch
from agent_mm.utils.allocator import keep_freed_memory
from agent_mm.utils.timing import measured_call
applied = keep_freed_memory() if sys.argv[1] == 'keep' else None
def allocate():
    torch.ones(16 * 2**20)
for _ in range(2):
    allocate()
calls = [measured_call(allocate, torch.device('cpu')) for _ in range(5)]
print(applied, statistics.median(call.faulted_bytes for call in calls))
'''
BLOCK_BYTES = 64 * 2**20


def allocation_faults(mode: str, tunables: str = None):
    env = {k: v for k, v in os.environ.items() if k != allocator.TUNABLES_ENV}
    if tunables is not None:
        env[allocator.TUNABLES_ENV] = tunables
    result = subprocess.run([sys.executable, '-c', FAULTS_SCRIPT, mode],
                            capture_output=True, text=True, env=env,
                            timeout=300, check=True)
    applied, faulted_bytes = result.stdout.split()
    return applied, float(faulted_bytes)


@glibc_only
def test_freed_memory_is_reused_without_page_faults():
    _, released = allocation_faults('default')
    applied, kept = allocation_faults('keep')
    assert released > 0.9 * BLOCK_BYTES  # each allocation mapped afresh
    assert applied == 'True'
    assert kept < BLOCK_BYTES / 10


@glibc_only
def test_malloc_tunables_of_the_user_are_left_alone():
    applied, faults = allocation_faults(
        'keep', tunables='glibc.malloc.trim_threshold=131072')
    assert applied == 'False'
    assert faults > 0.9 * BLOCK_BYTES


def test_thresholds_are_set_only_where_mallopt_exists(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, 'glibc_mallopt', lambda: None)
    monkeypatch.delenv(allocator.TUNABLES_ENV, raising=False)
    assert allocator.keep_freed_memory() is False
    monkeypatch.setattr(allocator, 'glibc_mallopt',
                        lambda: lambda *args: calls.append(args) or 1)
    assert allocator.keep_freed_memory() is True
    assert calls == [(allocator.M_MMAP_MAX, 0),
                     (allocator.M_TRIM_THRESHOLD,
                      allocator.TRIM_THRESHOLD_MAX)]
