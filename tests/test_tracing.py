"""Whether a graph is being traced (agent_mm/models/tracing.py)."""
import torch
import torch.nn as nn

from agent_mm.models.tracing import exporting, tracing


class _Recorder(nn.Module):
    """Records what ``exporting()`` and ``tracing()`` said in forward."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append((exporting(), tracing()))
        return x + 1


def test_eager_calls_are_not_traced():
    model = _Recorder()
    model(torch.ones(2))
    assert model.seen == [(False, False)]


def test_torch_export_is_exporting():
    model = _Recorder()
    torch.export.export(model, (torch.ones(2), ))
    assert model.seen and all(seen == (True, True) for seen in model.seen)


def test_jit_trace_is_exporting():
    model = _Recorder()
    # (its check would run the module eagerly once more)
    torch.jit.trace(model, torch.ones(2), check_trace=False)
    assert model.seen == [(True, True)]
