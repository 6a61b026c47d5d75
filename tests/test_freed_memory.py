"""KeepFreedMemoryHook: freed memory stays in the process (glibc)."""
import logging
import subprocess
import sys
import textwrap

import pytest
from mmengine.registry import HOOKS

import agent_mm.engine  # noqa: F401  (registers the hook)
from agent_mm.engine import freed_memory
from agent_mm.engine.freed_memory import (KeepFreedMemoryHook, glibc_mallopt,
                                          keep_freed_memory)

# Allocates 96 MB in blocks of 8 MB through the C library (below glibc's
# mmap limit, as a small training step's activations), frees them all, and
# prints how much of it the process's resident memory lost with the free,
# in the last of three rounds (the first sets glibc's adaptive thresholds).
RELEASED_MB = textwrap.dedent("""
    import ctypes, os, sys
    from agent_mm.engine.freed_memory import keep_freed_memory

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    BLOCK = 8 * 2**20

    def resident_mb():
        with open('/proc/self/statm') as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf('SC_PAGE_SIZE') / 2**20

    if sys.argv[1] == 'keep':
        assert keep_freed_memory()
    for _ in range(3):
        blocks = [libc.malloc(BLOCK) for _ in range(12)]
        for block in blocks:
            ctypes.memset(block, 1, BLOCK)
        before = resident_mb()
        for block in reversed(blocks):
            libc.free(block)
        released = before - resident_mb()
    print(released)
    """)


def released_mb(mode: str) -> float:
    """Resident MB a fresh process gives back when it frees 96 MB of 8-MB
    blocks, with the thresholds fixed (``'keep'``) or glibc's defaults."""
    result = subprocess.run([sys.executable, '-c', RELEASED_MB, mode],
                            capture_output=True,
                            text=True,
                            check=True)
    return float(result.stdout.split()[-1])


@pytest.mark.skipif(glibc_mallopt() is None, reason='glibc only')
def test_freed_memory_stays_in_the_process():
    # glibc's adaptive thresholds return the freed blocks to the kernel...
    assert released_mb('default') > 64
    # ...fixed ones keep them for the next allocations
    assert released_mb('keep') < 8


def test_does_nothing_where_the_library_is_not_glibc(monkeypatch):
    monkeypatch.setattr(freed_memory, 'glibc_mallopt', lambda: None)
    assert keep_freed_memory() is False


@pytest.mark.parametrize('kwargs, message', [
    (dict(mmap_threshold_mb=64), 'mmap_threshold_mb must be a whole number '
     'of MB from 1 to 32'),
    (dict(trim_threshold_mb=-1), 'trim_threshold_mb must be a whole number '
     'of MB from 0 to 2047'),
    (dict(trim_threshold_mb=1.5), 'trim_threshold_mb'),
])
def test_rejects_thresholds_glibc_does_not_take(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KeepFreedMemoryHook(**kwargs)
    with pytest.raises(ValueError, match=message):
        keep_freed_memory(**kwargs)


class _Runner:
    logger = logging.getLogger('test_freed_memory')


@pytest.mark.parametrize('applied, said', [(True, 'keeps up to 512 MB'),
                                           (False, 'not glibc')])
def test_hook_sets_its_thresholds_before_the_run(monkeypatch, caplog, applied,
                                                 said):
    calls = []

    def record(*args):
        calls.append(args)
        return applied

    monkeypatch.setattr(freed_memory, 'keep_freed_memory', record)
    hook = HOOKS.build(
        dict(
            type='KeepFreedMemoryHook',
            trim_threshold_mb=512,
            mmap_threshold_mb=16))
    with caplog.at_level(logging.INFO, logger='test_freed_memory'):
        hook.before_run(_Runner())
    assert calls == [(512, 16)]
    assert said in caplog.text
