"""Tests of agent_mm.utils.timing (the analysis tools' measurements)."""
import mmap
from typing import List

import torch
import torch.nn as nn

from agent_mm.utils import timing
from agent_mm.utils.timing import (Call, best_time, eval_step,
                                   interleaved_calls, interleaved_times,
                                   measured_call, page_faults, peak_bytes,
                                   replay_peak, timed, train_step)

CPU = torch.device('cpu')


class TwoOutputs(nn.Module):
    """A model returning a list of outputs, as the backbones do."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        y = self.linear(x)
        return [y, 2 * y]


def test_replay_peak_sorts_events_by_time():
    events = [(3, -5), (1, 10), (2, 5), (4, 2)]  # unsorted on purpose
    assert replay_peak(events) == 15
    assert replay_peak([]) == 0


def test_interleaved_times_rotates_the_order_and_warms_each_step():
    calls = []
    steps = {key: (lambda key=key: calls.append(key)) for key in 'abc'}
    times = interleaved_times(steps, warmup=1, repeats=3, device=CPU)
    assert {key: len(t) for key, t in times.items()} == dict(a=3, b=3, c=3)
    assert all(t >= 0 for ts in times.values() for t in ts)
    # a first untimed round, then each timed call right after one untimed
    # call of the same step
    assert calls == list('abc' 'aabbcc' 'bbccaa' 'ccaabb')


def test_measured_call_counts_the_memory_a_call_faults_in():
    size = 64 * 2**20
    kept = torch.ones(size, dtype=torch.uint8)  # faulted in once, here

    def write_fresh_pages() -> None:
        # a new anonymous mapping: every page faults in when first written,
        # whatever the C allocator's settings
        block = mmap.mmap(-1, size)
        torch.frombuffer(block, dtype=torch.uint8).fill_(1)

    fresh = measured_call(write_fresh_pages, CPU)
    reused = measured_call(lambda: kept.fill_(2), CPU)
    if page_faults() is None:  # no counter (Windows): faults are None
        assert fresh.faulted_bytes is None and reused.faulted_bytes is None
        return
    # at least one fault per 2 MiB even where huge pages back the block
    assert fresh.faulted_bytes >= size // (2 * 2**20) * mmap.PAGESIZE
    assert reused.faulted_bytes < fresh.faulted_bytes
    assert fresh.seconds >= 0 and reused.seconds >= 0


def test_no_untimed_round_without_warmup():
    calls = []
    steps = {key: (lambda key=key: calls.append(key)) for key in 'ab'}
    interleaved_calls(steps, warmup=0, repeats=2, device=CPU)
    assert calls == list('ab' 'ba')


def test_interleaved_times_are_the_seconds_of_interleaved_calls():
    steps = {key: (lambda: None) for key in 'ab'}
    calls = interleaved_calls(steps, warmup=0, repeats=2, device=CPU)
    assert {key: len(c) for key, c in calls.items()} == dict(a=2, b=2)
    counted = page_faults() is not None
    assert all((call.faulted_bytes is not None) == counted
               for c in calls.values() for call in c)
    times = interleaved_times(steps, warmup=0, repeats=2, device=CPU)
    assert {key: len(t) for key, t in times.items()} == dict(a=2, b=2)


def test_interleaved_times_keep_only_the_seconds(monkeypatch):
    calls = dict(a=[Call(0.25, 7), Call(0.5, 9)], b=[Call(1.0, None)])
    monkeypatch.setattr(timing, 'interleaved_calls', lambda *args: calls)
    times = interleaved_times({}, warmup=0, repeats=2, device=CPU)
    assert times == dict(a=[0.25, 0.5], b=[1.0])


def test_timed_measures_the_call():
    calls = []
    assert timed(lambda: calls.append(1), CPU) >= 0
    assert calls == [1]


def test_train_step_makes_fresh_gradients_at_every_call():
    model = TwoOutputs()
    step = train_step(model, torch.ones(2, 4))
    step()
    first = model.linear.weight.grad
    # d(sum(y) + sum(2y)) / dW = 3 * (sum over the batch of x) per output
    assert torch.equal(first, torch.full((3, 4), 6.))
    step()
    # dropped and recomputed, not accumulated
    assert model.linear.weight.grad is not first
    assert torch.equal(model.linear.weight.grad, first)


def test_eval_step_builds_no_graph():
    model = TwoOutputs()
    outputs = []
    model.register_forward_hook(lambda m, i, o: outputs.append(o))
    eval_step(model, torch.ones(2, 4))()
    assert model.linear.weight.grad is None
    assert not outputs[0][0].requires_grad


def test_cpu_peak_bytes_counts_what_the_call_allocates():
    live = torch.ones(1 << 20)  # allocated before: not counted

    def step() -> None:
        first = torch.empty(1 << 20)  # 4 MiB
        second = torch.empty(1 << 19)  # 2 MiB while the first is live
        del first, second
        torch.empty(1 << 18)  # 1 MiB after both are freed

    assert peak_bytes(step, CPU) == (4 + 2) * 2**20
    assert peak_bytes(live.zero_, CPU) == 0


def test_best_time_calls_once_untimed_then_each_repeat():
    calls = []
    seconds = best_time(lambda: calls.append(1), CPU, repeats=4)
    assert len(calls) == 1 + 4
    assert seconds >= 0
