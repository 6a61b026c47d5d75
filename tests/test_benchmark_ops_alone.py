"""Every op of a forward timed in it and alone (agent_mm.benchmark.ops_alone),
on tiny models. Only structure and bookkeeping are checked, never timings
(the machine is noisy)."""
import pytest
import torch
import torch.nn as nn

from agent_mm.benchmark.ops_alone import (copy_argument, op_name, op_times,
                                          time_alone)


def test_op_name_drops_the_overload():
    assert op_name(torch.ops.aten.addmm.out) == 'aten::addmm'
    assert op_name(torch.ops.aten.add_.Tensor) == 'aten::add_'


def test_copy_argument_keeps_the_view_layout_in_a_storage_of_its_own():
    base = torch.arange(24.).reshape(4, 6)
    view = base[1:, ::2]
    copy = copy_argument(view)
    assert torch.equal(copy, view)
    assert (copy.stride(), copy.storage_offset()) == (view.stride(),
                                                      view.storage_offset())
    assert copy.untyped_storage().data_ptr() != (
        view.untyped_storage().data_ptr())
    copy.zero_()
    assert torch.equal(base, torch.arange(24.).reshape(4, 6))
    assert copy_argument(3) == 3 and copy_argument(None) is None


def test_time_alone_runs_in_place_ops_on_copies():
    x, y = torch.ones(8), torch.full((8, ), 2.)
    seconds = time_alone(torch.ops.aten.add_.Tensor, (x, y), {}, repeats=3)
    assert seconds > 0
    assert torch.equal(x, torch.ones(8))


class Shift(nn.Module):
    """Adds 1 in place: wrong after any extra run on its own input."""

    def forward(self, x):
        return x.add_(1.0)


def test_op_times_match_the_forwards_op_by_op():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), Shift()).eval()
    inputs = torch.randn(4, 16)
    with torch.no_grad():
        expected = model(inputs)
    outputs = []
    model.register_forward_hook(lambda *args: outputs.append(args[2]))
    ops = op_times(model, inputs, repeats=2)
    names = [op.name for op in ops]
    assert {'aten::addmm', 'aten::gelu', 'aten::add_'} <= set(names)
    assert all(op.in_forward_s > 0 and op.alone_s > 0 for op in ops)
    # the re-runs worked on copies: both forwards computed what they do
    assert len(outputs) == 2
    assert all(torch.equal(out, expected) for out in outputs)


class Alternating(nn.Module):
    """A forward that adds an op every other call."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * 2 if self.calls % 2 else (x * 2).exp()


def test_op_times_refuse_forwards_that_differ():
    with pytest.raises(RuntimeError, match='dispatched different ops'):
        op_times(Alternating(), torch.ones(3))
