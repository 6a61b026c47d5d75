"""The installed torch's release (agent_mm/utils/versions.py)."""
import pytest
import torch

from agent_mm.utils.versions import torch_before


@pytest.mark.parametrize('installed, before_2_7', [('2.6.0+cu124', True),
                                                   ('2.7.0', False),
                                                   ('2.13.0+cpu', False)])
def test_torch_before_compares_releases_not_text(monkeypatch, installed,
                                                 before_2_7):
    monkeypatch.setattr(torch, '__version__', installed)
    assert torch_before('2.7.0') is before_2_7
    assert torch_before('2.10') is (installed != '2.13.0+cpu')
