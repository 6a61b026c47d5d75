"""The benchmark's model registry and measuring functions, on tiny models.

Only structure and counts are checked, never timings (the machine is
noisy).
"""
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from agent_mm.benchmark import measure as measure_module
from agent_mm.benchmark.measure import (MB, PATH_SPECIFIC_OPS, Timing,
                                        bias_cache_bytes, count_flops,
                                        fault_mb, flops_wanted, matmul_gflops,
                                        matmul_step, measure, measure_scaling,
                                        output_differences)
from agent_mm.benchmark.models import (MODELS, build_models, parameter_counts,
                                       reference_twin, size_text, token_count,
                                       within_limits)
from agent_mm.utils.timing import Call

CPU = torch.device('cpu')
TIMING = Timing(warmup=1, repeats=2, device=CPU)
# the side of the product timed beside eval calls: small, for a CPU that
# emulates bfloat16 takes minutes for the tool's 2048³
MATMUL = 32


class TinyBackbone(nn.Module):
    """A 1×1 convolution from 3 to 4 channels, optionally followed by
    self-attention over the pixels; returns a tuple like a backbone."""

    def __init__(self, attend: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.attend = attend

    def forward(self, x):
        out = self.conv(x)
        if self.attend:
            tokens = out.flatten(2).transpose(1, 2)
            out = F.scaled_dot_product_attention(tokens, tokens, tokens)
        return (out, )


def test_registry_names_existing_twins_and_baselines():
    for key, spec in MODELS.items():
        assert spec.reference_of is None or spec.reference_of in MODELS
        assert spec.baseline is None or spec.baseline in MODELS
        if spec.reference_of:
            assert reference_twin(spec.reference_of) == key
    assert reference_twin('agent_pvt_t') == 'agent_pvt_t_ref'
    assert reference_twin('pvt_t') is None
    assert reference_twin('agent_pvt_t_nocache') is None
    assert len({spec.label for spec in MODELS.values()}) == len(MODELS)


def test_sizes_and_token_limits():
    assert token_count((800, 1333)) == 66650
    assert size_text([800, 1333]) == '800×1333'
    models = dict(a=nn.Identity(), b=nn.Identity(), c=nn.Identity())
    limits = dict(a=64, b=63)
    assert list(within_limits(models, (32, 32), limits)) == ['a', 'c']
    assert list(within_limits(models, (16, 16), limits)) == ['a', 'b', 'c']


def test_reference_model_gets_its_fast_twins_weights():
    torch.manual_seed(0)
    models = build_models(['agent_pvt_t', 'agent_pvt_t_ref'], CPU)
    fast, ref = models['agent_pvt_t'], models['agent_pvt_t_ref']
    for (name, a), (_, b) in zip(fast.state_dict().items(),
                                 ref.state_dict().items()):
        assert torch.equal(a, b), name
    counts = parameter_counts(models)
    assert counts['agent_pvt_t'] == counts['agent_pvt_t_ref'] > 10**7


def test_bias_cache_bytes_follow_the_eval_cache():
    torch.manual_seed(0)
    model = MODELS['agent_pvt_t'].build().eval()
    assert bias_cache_bytes(model) == 0
    sizes = []
    with torch.no_grad():
        for size in ((32, 32), (48, 64)):
            for _ in range(2):  # a shape is cached at its second forward
                model(torch.randn(1, 3, *size))
            sizes.append(bias_cache_bytes(model))
    assert 0 < sizes[0] < sizes[1]
    model.eval()  # empties the cache
    assert bias_cache_bytes(model) == 0
    uncached = MODELS['agent_pvt_t_nocache'].build().eval()
    with torch.no_grad():
        uncached(torch.randn(1, 3, 32, 32))
    assert bias_cache_bytes(uncached) == 0
    assert bias_cache_bytes(TinyBackbone()) == 0


def test_count_flops_splits_off_the_attention():
    inputs = torch.randn(1, 3, 8, 8)
    conv = 8 * 8 * 4 * 3  # one multiply-add per pixel, output and input
    attention = 2 * 64 * 64 * 4
    assert count_flops(TinyBackbone(), inputs) == (conv, conv, [])
    assert count_flops(TinyBackbone(attend=True),
                       inputs) == (conv + attention, conv, [])
    assert 'scaled_dot_product_attention' in PATH_SPECIFIC_OPS


def test_flops_wanted_up_to_the_peak_limit():
    assert flops_wanted(1e6, None)
    assert flops_wanted(10.0, 10.0)
    assert not flops_wanted(10.5, 10.0)


def test_output_differences_of_each_pair():
    fast, ref, other = TinyBackbone(), TinyBackbone(), TinyBackbone()
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():
        ref.conv.bias += 0.5
    models = dict(agent_pvt_t=fast, agent_pvt_t_ref=ref, pvt_t=other)
    diffs = output_differences(models, torch.randn(1, 3, 4, 4))
    assert diffs == {'agent_pvt_t': pytest.approx(0.5)}
    assert output_differences(dict(agent_pvt_t_ref=ref),
                              torch.randn(1, 3, 4, 4)) == {}


def test_fault_mb_is_a_statistic_of_the_calls_or_none_if_one_is_missing():
    calls = [Call(0.1, 2 * MB), Call(0.2, 6 * MB), Call(0.3, 4 * MB)]
    assert fault_mb(calls) == 4.
    assert fault_mb(calls, sum) == 12.
    assert fault_mb(calls + [Call(0.1, None)]) is None


def test_timing_interleaves_every_step():
    calls = []
    times = TIMING.times(dict(a=lambda: calls.append('a'),
                              b=lambda: calls.append('b')))
    assert {key: len(t) for key, t in times.items()} == dict(a=2, b=2)
    # an untimed round, then each timed call right after one untimed call;
    # the order rotates
    assert calls == ['a', 'b', 'a', 'a', 'b', 'b', 'b', 'b', 'a', 'a']


@pytest.mark.parametrize('train', [False, True])
def test_measure_rows(train):
    models = dict(one=TinyBackbone(), two=TinyBackbone(attend=True))
    rows = measure(models, (8, 12), 2, train, TIMING, matmul_size=MATMUL)
    assert [row['model'] for row in rows] == ['one', 'two']
    eval_fields = {
        'bias_cache_mb', 'flops', 'layer_flops', 'unsupported_ops',
        'matmul_gflops'
    }
    for row in rows:
        fields = {'model', 'size', 'dtype', 'batch', 'tokens', 'times_ms',
                  'median_ms', 'fault_mb', 'peak_mb'} | (set() if train else
                                                         eval_fields)
        assert set(row) == fields
        assert row['fault_mb'] >= 0  # counted on Linux
        assert row['size'] == [8, 12] and row['batch'] == 2
        assert row['dtype'] == 'float32'
        assert row['tokens'] == 6
        assert len(row['times_ms']) == TIMING.repeats
        assert row['median_ms'] == statistics.median(row['times_ms'])
        assert row['peak_mb'] > 0
        assert not train or all(p.grad is None
                                for p in models[row['model']].parameters())
    if not train:
        assert [row['flops'] for row in rows] == [2 * 96 * 12, 2 * 96 * 12 +
                                                  2 * 2 * 96 * 96 * 4]
        assert all(row['bias_cache_mb'] == 0 for row in rows)
        assert all(row['matmul_gflops'] > 0 for row in rows)


def test_eval_rows_of_each_precision_get_that_precisions_product_rate(
        monkeypatch):
    timed = []  # the dtype of each product timed for a rate

    def spy(dtype, size, device):
        timed.append(dtype)
        return matmul_step(dtype, size, device)

    monkeypatch.setattr(measure_module, 'matmul_step', spy)
    rows = measure(dict(one=TinyBackbone()), (8, 8), 1, False, TIMING,
                   dtypes=('float32', 'bfloat16'), matmul_size=MATMUL)
    assert [row['dtype'] for row in rows] == ['float32', 'bfloat16']
    assert set(timed) == {torch.float32, torch.bfloat16}
    assert all(row['matmul_gflops'] > 0 for row in rows)


def test_matmul_step_and_rate():
    step = matmul_step(torch.bfloat16, 4, CPU)
    assert step().dtype == torch.bfloat16 and step().shape == (4, 4)
    calls = [Call(seconds, None) for seconds in (2e-3, 1e-3, 4e-3)]
    # 2 * 100³ flops in the median 2 ms
    assert matmul_gflops(calls, 100) == pytest.approx(1.0)


def test_measure_skips_flops_above_the_peak_limit():
    rows = measure(dict(one=TinyBackbone()), (8, 8), 1, False, TIMING, -1.0,
                   matmul_size=MATMUL)
    assert (rows[0]['flops'], rows[0]['layer_flops'],
            rows[0]['unsupported_ops']) == (None, None, None)


def test_measure_scaling_alternates_two_sizes():
    scaling = measure_scaling('one', TinyBackbone(), [(8, 8), (16, 8)], 1,
                              TIMING)
    assert scaling['model'] == 'one' and scaling['dtype'] == 'float32'
    assert scaling['sizes'] == [[8, 8], [16, 8]]
    assert list(scaling['times_ms']) == ['8×8', '16×8']
    assert [len(t) for t in scaling['times_ms'].values()] == [2, 2]
    first, second = scaling['median_ms']
    assert scaling['ratio'] == pytest.approx(second / first)
