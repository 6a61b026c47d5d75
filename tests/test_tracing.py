"""Whether a graph is being traced (agent_mm/models/tracing.py)."""
import torch
import torch.nn as nn

from agent_mm.models.tracing import exporting, torch_exporting, tracing


class _Recorder(nn.Module):
    """Records what ``exporting()`` and ``tracing()`` said in forward, in a
    list outside the module (torch.export works on a copy of the
    module's attributes)."""

    def __init__(self, seen: list):
        super().__init__()
        self.record = seen.append

    def forward(self, x):
        self.record((exporting(), tracing()))
        return x + 1


def test_eager_calls_are_not_traced():
    seen = []
    _Recorder(seen)(torch.ones(2))
    assert seen == [(False, False)]


def test_torch_export_is_exporting():
    seen = []
    torch.export.export(_Recorder(seen), (torch.ones(2), ), strict=False)
    assert seen and all(said == (True, True) for said in seen)


def test_jit_trace_is_exporting():
    seen = []
    # (its check would run the module eagerly once more)
    torch.jit.trace(_Recorder(seen), torch.ones(2), check_trace=False)
    assert seen == [(True, True)]


def test_torch_before_2_7_tells_export_by_is_compiling(monkeypatch):
    # PyTorch 2.6 has no torch.compiler.is_exporting
    monkeypatch.delattr(torch.compiler, 'is_exporting', raising=False)
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: compiling)
        assert torch_exporting() is compiling
        assert exporting() is compiling
