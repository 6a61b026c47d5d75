"""Shared fixtures of the test suite."""
import contextlib
import os
import sys
import threading
import types

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist, give each worker its share of the cores, for
    torch here and for the processes the tests start (``mim train``, ...),
    so that the workers do not oversubscribe the machine."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault('OMP_NUM_THREADS', str(threads))


@pytest.fixture(autouse=True)
def _seed():
    """Keep tests reproducible."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _process_state(monkeypatch):
    """What the tools change for their whole process, kept to the test that
    runs them in the pytest process: torch's thread count, ``LOCAL_RANK``
    (``load_config`` sets it) and glibc's malloc settings
    (``keep_freed_memory``'s ``mallopt`` calls are answered without
    reaching glibc; tests/test_allocator.py checks the real ones in
    processes of their own)."""
    from agent_mm.utils import allocator
    monkeypatch.setattr(allocator, 'glibc_mallopt',
                        lambda: (lambda parameter, value: 1))
    threads, local_rank = torch.get_num_threads(), os.environ.get(
        'LOCAL_RANK')
    yield
    torch.set_num_threads(threads)
    if local_rank is None:
        os.environ.pop('LOCAL_RANK', None)
    else:
        os.environ['LOCAL_RANK'] = local_rank


class _CfgNode(dict):
    """Stand-in for yacs' ``CfgNode``: a dict with attributes in
    ``__dict__``, pickled under the name ``yacs.config.CfgNode``."""

    def __init__(self, **items):
        super().__init__(**items)
        self.__dict__['__immutable__'] = True
        self.__dict__['__new_allowed__'] = False

    @staticmethod
    @contextlib.contextmanager
    def importable():
        """Make ``yacs.config.CfgNode`` importable (for ``torch.save``) only
        inside the block, so loading is tested without yacs."""
        yacs = types.ModuleType('yacs')
        yacs_config = types.ModuleType('yacs.config')
        yacs_config.CfgNode = _CfgNode
        names = ('yacs', 'yacs.config')
        saved = {name: sys.modules.get(name) for name in names}
        sys.modules.update({'yacs': yacs, 'yacs.config': yacs_config})
        try:
            yield
        finally:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module


_CfgNode.__module__ = 'yacs.config'
_CfgNode.__qualname__ = 'CfgNode'


@pytest.fixture
def yacs_cfgnode():
    """The class the authors' ImageNet checkpoints pickle as config."""
    return _CfgNode


@pytest.fixture
def log_messages(monkeypatch):
    """The messages that backbone checkpoint loading logs."""
    import agent_mm.models.checkpoint as checkpoint_module
    messages = []
    monkeypatch.setattr(checkpoint_module, 'print_log',
                        lambda msg, **kwargs: messages.append(msg))
    return messages


@pytest.fixture(params=['dense', 'separable'])
def bias_build(request, monkeypatch):
    """Runs a test with every bias map built by one dense product, then by
    the separable products (whatever ``builds_by_product`` would pick)."""
    from agent_mm.models import bias_maps
    dense = request.param == 'dense'
    monkeypatch.setattr(bias_maps, 'builds_by_product',
                        lambda *args: dense)
    return request.param


@pytest.fixture
def maps_by_rows(monkeypatch):
    """The calls of ``bias_maps.resize_rows_into`` made while the test runs
    (the calls still compute), with every bias map built separably, never
    by one dense product (maps of small test sizes would be)."""
    from agent_mm.models import bias_maps
    monkeypatch.setattr(bias_maps, 'builds_by_product', lambda *args: False)
    calls = []
    resize_rows_into = bias_maps.resize_rows_into

    def spy(*args):
        calls.append(args)
        return resize_rows_into(*args)

    monkeypatch.setattr(bias_maps, 'resize_rows_into', spy)
    return calls


@pytest.fixture
def sdpa_masks(monkeypatch):
    """The ``attn_mask`` of every ``scaled_dot_product_attention`` call made
    while the test runs, in order (the calls still compute)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    masks = []

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention',
                        spy)
    return masks


@pytest.fixture
def run_in_threads():
    """``run(work, count)``: call ``work(i)`` in ``count`` threads at once,
    switching threads between any two bytecodes, so that races show; returns
    the ``repr`` of every exception raised, and fails if a thread hangs."""

    def run(work, count):
        failures = []

        def guarded(index):
            try:
                work(index)
            except Exception as error:  # noqa: B902 (any failure is reported)
                failures.append(repr(error))

        threads = [
            threading.Thread(target=guarded, args=(i, ), daemon=True)
            for i in range(count)
        ]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
        finally:
            sys.setswitchinterval(interval)
        assert not any(thread.is_alive() for thread in threads), 'hung'
        return failures

    return run
