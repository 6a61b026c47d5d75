"""Shared fixtures of the test suite."""
import contextlib
import sys
import types

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Keep tests reproducible."""
    torch.manual_seed(0)


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
