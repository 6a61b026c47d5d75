"""Fault injection for checkpoint saves: a writer that stops halfway.

Run as a script, it trains with ``tools/train.py`` after making the N-th
checkpoint write stop halfway, create MARKER and sleep (to be killed)::

    python tests/checkpoint_faults.py MARKER N CONFIG [train.py options]
"""
import os.path as osp
import runpy
import sys
import time
from typing import Callable

from mmengine.fileio import LocalBackend

TRAIN = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools',
                 'train.py')


def halfway_put(nth: int, then: Callable[[], None]) -> Callable:
    """A ``LocalBackend.put`` whose ``nth`` write of a ``.pth`` file (the
    temporary one, if the hook uses one) writes half the bytes, then calls
    ``then``, which should raise or not return."""
    original = LocalBackend.put
    calls = 0

    def put(self, obj: bytes, filepath) -> None:
        nonlocal calls
        if '.pth' in osp.basename(filepath):
            calls += 1
            if calls == nth:
                with open(filepath, 'wb') as f:
                    f.write(obj[:len(obj) // 2])
                then()
        original(self, obj, filepath)

    return put


def _hang(marker: str) -> None:
    """Tell the test that the file is half written, then wait for SIGKILL."""
    with open(marker, 'w'):
        pass
    time.sleep(600)


if __name__ == '__main__':
    marker_path, nth_write = sys.argv[1], int(sys.argv[2])
    LocalBackend.put = halfway_put(nth_write, lambda: _hang(marker_path))
    sys.argv = [TRAIN, *sys.argv[3:]]
    runpy.run_path(TRAIN, run_name='__main__')
