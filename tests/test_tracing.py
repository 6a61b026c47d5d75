"""Whether a graph is being traced (agent_mm/models/tracing.py)."""
import pytest
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


def test_torch_compile_is_tracing_but_not_exporting():
    seen = []
    torch.compile(_Recorder(seen), backend='eager')(torch.ones(2))
    assert seen == [(False, True)]


@pytest.mark.parametrize('flag', [False, True])
def test_the_export_flag_is_read_where_torch_has_it(monkeypatch, flag):
    # PyTorch 2.7's dynamo answers is_exporting() with True in any graph
    monkeypatch.setattr(torch.compiler, '_is_exporting_flag', flag,
                        raising=False)
    monkeypatch.setattr(torch.compiler, 'is_exporting', lambda: True,
                        raising=False)
    assert torch_exporting() is flag


@pytest.mark.parametrize('exporting_said', [False, True])
def test_is_exporting_answers_where_the_flag_is_gone(monkeypatch,
                                                     exporting_said):
    monkeypatch.delattr(torch.compiler, '_is_exporting_flag', raising=False)
    monkeypatch.setattr(torch.compiler, 'is_exporting',
                        lambda: exporting_said,
                        raising=False)
    assert torch_exporting() is exporting_said


@pytest.mark.parametrize('compiling, dynamo, said', [
    (False, False, False),  # eager
    (True, True, False),  # torch.compile
    (True, False, True),  # torch.export, non-strict
])
def test_torch_before_2_7_tells_export_from_compile(monkeypatch, compiling,
                                                    dynamo, said):
    # PyTorch 2.6 has neither is_exporting nor its flag
    monkeypatch.delattr(torch.compiler, '_is_exporting_flag', raising=False)
    monkeypatch.delattr(torch.compiler, 'is_exporting', raising=False)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: compiling)
    monkeypatch.setattr(torch.compiler, 'is_dynamo_compiling', lambda: dynamo)
    assert torch_exporting() is said
    assert exporting() is said
    assert tracing() is compiling
