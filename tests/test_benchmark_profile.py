"""The profile by op family (agent_mm.benchmark.profile and
tools/analysis_tools/profile_backbones.py), on tiny models and inputs.

Only structure and counts are checked, never timings (the machine is
noisy).
"""
import json
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_benchmark_tools import load_tool
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from agent_mm.benchmark import profile as profile_module
from agent_mm.benchmark.ops_alone import OpTime
from agent_mm.benchmark.profile import (ATTENTION, FAMILIES, FAMILY_PATTERNS,
                                        GEMM, LAYOUT, OTHER, VIEW,
                                        ProfileSettings, Roofline, Tally,
                                        attention_flops, element_rate,
                                        event_bytes, event_flops, family_rows,
                                        family_times, linear_flops, markdown,
                                        op_family, profiler_records_dtypes,
                                        run_profiles, tally)
from agent_mm.models.layers import activate_
from agent_mm.ops import blocked_attention

# the op profile needs its events' input dtypes (stopped with an error on
# the torch releases whose profiler has none: the last test here)
records_dtypes = pytest.mark.skipif(
    not profiler_records_dtypes(),
    reason='the profiler of this torch records no input dtypes (2.6-2.10)')

KNOWN_FAMILIES = {
    GEMM: ['mm', 'bmm', 'addmm', 'baddbmm', 'matmul', 'linear'],
    ATTENTION: [
        'scaled_dot_product_attention',
        '_scaled_dot_product_flash_attention_for_cpu',
        '_scaled_dot_product_attention_math'
    ],
    'convolution': [
        'conv2d', 'convolution', '_convolution', 'mkldnn_convolution',
        '_slow_conv2d_forward', 'thnn_conv2d'
    ],
    'softmax': ['softmax', '_softmax', '_safe_softmax', 'log_softmax'],
    'normalisation': [
        'layer_norm', 'native_layer_norm', 'batch_norm',
        '_native_batch_norm_legit_no_training', 'group_norm'
    ],
    'activation': ['gelu', 'relu', 'relu_', 'silu', 'sigmoid'],
    'elementwise': ['add', 'add_', 'mul', 'div_', 'where', 'maximum', 'fill_'],
    LAYOUT: [
        'copy_', 'clone', 'cat', '_to_copy', 'index', 'constant_pad_nd',
        'roll', 'im2col'
    ],
    'interpolation':
    ['upsample_bilinear2d', 'upsample_linear1d', 'grid_sampler_2d'],
    'reduction/pooling':
    ['adaptive_avg_pool2d', 'max_pool2d_with_indices', 'mean', 'sum'],
    VIEW: [
        'view', 'transpose', 'permute', 'as_strided', 'contiguous', 'to',
        'reshape', 'empty', 'empty_like', 'resolve_conj'
    ],
    OTHER: ['frobnicate', '_nonexistent_op'],
}


@pytest.mark.parametrize('family, ops', KNOWN_FAMILIES.items())
def test_op_family_maps_known_names(family, ops):
    assert [op_family(f'aten::{op}') for op in ops] == [family] * len(ops)


def test_op_families_are_listed_once_and_other_namespaces_are_other():
    assert set(FAMILIES) == set(KNOWN_FAMILIES)
    assert len(FAMILIES) == len(set(FAMILIES)) and FAMILIES[-1] == OTHER
    assert all(re.compile(pattern) for pattern in FAMILY_PATTERNS)
    assert op_family('prim::mm') == op_family('mm') == OTHER


def event(name, shapes=(), dtypes=(), flops=None, children=(), self_us=0.0):
    """A stand-in for a profiler event."""
    return SimpleNamespace(
        name=f'aten::{name}',
        input_shapes=list(shapes),
        input_dtypes=list(dtypes),
        flops=flops,
        cpu_children=list(children),
        self_cpu_time_total=self_us)


def test_event_bytes_count_inputs_and_a_same_size_output():
    # out-of-place elementwise: inputs and an output like the largest
    add = event('add', [[2, 3], [3], []], ['float', 'float', 'Scalar'])
    assert event_bytes(add, 'elementwise') == 24 + 12 + 24
    # in place: the output is the first input
    add_ = event('add_', [[2, 3], [3], []], ['float', 'float', 'Scalar'])
    assert event_bytes(add_, 'elementwise') == 24 + 12
    copy = event('copy_', [[4, 8], [4, 8], []],
                 ['c10::BFloat16', 'float', 'Scalar'])
    assert event_bytes(copy, LAYOUT) == 64 + 128
    # products: inputs only; tensor lists and scalars are not recorded
    mm = event('mm', [[4, 8], [8, 8]], ['c10::Half', 'c10::Half'])
    assert event_bytes(mm, GEMM) == 64 + 128
    cat = event('cat', [[], []], ['TensorList', 'Scalar'])
    assert event_bytes(cat, LAYOUT) == 0


def test_event_flops_add_fused_attention_to_the_profilers_counts():
    q, k, v = [1, 2, 5, 4], [1, 2, 7, 4], [1, 2, 7, 6]
    assert attention_flops([q, k, v]) == 2 * 2 * 5 * 7 * (4 + 6)
    fused = event('_scaled_dot_product_flash_attention_for_cpu',
                  [q, k, v, [], []], flops=0)
    assert event_flops(fused) == 1400
    # the math path's products are counted by the profiler
    assert event_flops(event('_scaled_dot_product_attention_math', [q, k, v],
                             flops=0)) == 0
    assert event_flops(event('mm', flops=512)) == 512
    assert event_flops(event('view')) == 0


def test_tally_counts_bytes_once_per_family_chain():
    x = ([[4, 8]], ['float'])
    native = event('native_layer_norm', *x, self_us=30.0)
    layer_norm = event('layer_norm', *x, children=[native], self_us=2.0)
    copy = event('copy_', [[4, 8], [4, 8]], ['float', 'float'], self_us=5.0)
    empty = event('empty_like', *x, self_us=1.0)
    clone = event('clone', *x, children=[empty, copy], self_us=3.0)
    contiguous = event('contiguous', *x, children=[clone], self_us=1.0)
    mm = event('mm', [[4, 8], [8, 8]], ['float', 'float'], 512, self_us=8.0)
    matmul = event('matmul', [[4, 8], [8, 8]], ['float', 'float'],
                   children=[mm], self_us=1.0)
    other = SimpleNamespace(**dict(vars(event('mm')), name='prim::Foo'))
    events = [layer_norm, native, contiguous, clone, empty, copy, matmul, mm,
              other]
    tallies = tally(events)
    assert list(tallies) == list(FAMILIES)
    assert tallies['normalisation'] == Tally(32.0, 0, 2 * 128)
    assert tallies[LAYOUT] == Tally(8.0, 0, 256)
    assert tallies[VIEW] == Tally(2.0, 0, 0)
    assert tallies[GEMM] == Tally(9.0, 512, 128 + 256)
    assert tallies[OTHER] == Tally()


def _onednn_linear(self_us=0.0):
    """A profiler event of oneDNN's linear (the bfloat16 MLPs' products)."""
    linear = event('mm', [[2, 5, 8], [16, 8], [16]],
                   ['c10::BFloat16'] * 3, self_us=self_us)
    return SimpleNamespace(**dict(vars(linear),
                                  name='mkldnn::_linear_pointwise'))


def test_onednn_linear_is_a_product_with_its_flops():
    assert op_family('mkldnn::_linear_pointwise') == GEMM
    assert op_family('mkldnn::_convolution_pointwise') == OTHER
    linear = _onednn_linear()
    assert linear_flops(linear.input_shapes) == 2 * 10 * 8 * 16
    assert event_flops(linear) == 2 * 10 * 8 * 16
    totals = tally([_onednn_linear(self_us=7.0)])
    assert totals[GEMM] == Tally(7.0, 2560, 2 * (80 + 128 + 16))
    assert totals[OTHER] == Tally()


def test_tally_counts_the_elements_of_compute_bound_ops():
    gelus = [
        event('gelu', [[4, 8], []], ['c10::BFloat16', 'Scalar']),
        event('gelu', [[2, 3]], ['float']),
        event('gelu_', [[5, 2]], ['float']),
    ]
    relu = event('relu', [[4, 8]], ['float'])
    activation = tally(gelus + [relu])['activation']
    assert activation.elements == {'aten::gelu': 32 + 6, 'aten::gelu_': 10}
    assert activation.bytes == 2 * 64 + 2 * 24 + 40 + 2 * 128


@records_dtypes
def test_tally_rates_the_gelus_the_models_run():
    x = torch.randn(3, 40)
    with torch_profile(activities=[ProfilerActivity.CPU],
                       record_shapes=True) as prof:
        activate_(nn.GELU(), x)  # the models' MLPs in inference
        F.gelu(x)
    assert tally(prof.events())['activation'].elements == {
        'aten::gelu_': 120,
        'aten::gelu': 120
    }


def test_element_rate_is_the_best_over_the_sizes():
    calls = []

    def op(x):
        calls.append((x.numel(), x.dtype))
        return x

    rate = element_rate(op, torch.bfloat16, torch.device('cpu'),
                        sizes=(4, 8), repeats=2)
    # one untimed call, then the timed ones, at each size
    assert calls == [(4, torch.bfloat16)] * 3 + [(8, torch.bfloat16)] * 3
    assert rate > 0


def test_floor_is_the_largest_of_flops_bytes_and_rated_elements():
    roofline = Roofline(
        matmul_flops=1e9, bandwidth=1e9, element_rates={'aten::gelu': 1e8})
    # 10**6 elements at 1e8/s: 10 ms, above the bytes' 2 ms
    gelu = Tally(bytes=2 * 10**6, elements={'aten::gelu': 10**6})
    assert roofline.floor_s(gelu) == pytest.approx(10e-3)
    # the same op, bandwidth-bound where its bytes take longer
    assert roofline.floor_s(
        Tally(bytes=3 * 10**7, elements={'aten::gelu': 10**6})) == (
            pytest.approx(30e-3))
    # families without rated ops need no rates
    assert Roofline(1e9, 1e9).floor_s(Tally(flops=10**6)) == (
        pytest.approx(1e-3))


def test_family_rows_share_time_and_compare_with_floors():
    roofline = Roofline(matmul_flops=1e9, bandwidth=1e9)
    tallies = {family: Tally() for family in FAMILIES}
    tallies[GEMM] = Tally(6000.0, 4 * 10**6, 10**6)  # floor 4 ms
    tallies[LAYOUT] = Tally(3000.0, 0, 2 * 10**6)  # floor 2 ms
    tallies[VIEW] = Tally(1000.0)  # no floor
    assert roofline.floor_s(tallies[GEMM]) == pytest.approx(4e-3)
    rows = family_rows(tallies, roofline, calls=2)
    assert [row['family'] for row in rows] == [GEMM, VIEW, LAYOUT]
    gemm, view, layout = rows
    assert [row['share'] for row in rows] == pytest.approx([60, 10, 30])
    assert (gemm['ms'], gemm['floor_ms']) == pytest.approx((3.0, 2.0))
    assert gemm['x_floor'] == pytest.approx(1.5)
    assert gemm['gflops'] == pytest.approx(2e-3)
    assert layout['floor_ms'] == pytest.approx(1.0)
    assert view['floor_ms'] is None and view['x_floor'] is None


@records_dtypes
def test_profile_of_a_tiny_run(monkeypatch):
    # the fused attention kernel in both precisions, whatever this CPU (in
    # bfloat16 without AMX the fast path computes attention as products)
    monkeypatch.setattr(blocked_attention, 'cpu_lacks_amx_for_bfloat16',
                        lambda: False)
    settings = ProfileSettings(
        models=['agent_pvt_t'],
        sizes=[(64, 64)],
        dtypes=['float32', 'bfloat16'],
        matmul_size=256,
        copy_mb=8,
        alone=1)
    results = run_profiles(settings)
    meta = results['meta']
    assert list(meta['matmul_gflops']) == ['float32', 'bfloat16']
    assert min(meta['matmul_gflops'].values()) > 0
    assert meta['bandwidth_gb_s'] > 0 and meta['threads'] == 1
    assert {dtype: set(ops) for dtype, ops in meta['gelements_s'].items()
            } == {dtype: {'aten::gelu', 'aten::gelu_'}
                  for dtype in ('float32', 'bfloat16')}
    assert min(rate for ops in meta['gelements_s'].values()
               for rate in ops.values()) > 0
    assert [(p['model'], p['size'], p['dtype'])
            for p in results['profiles']] == [('agent_pvt_t', [64, 64],
                                               'float32'),
                                              ('agent_pvt_t', [64, 64],
                                               'bfloat16')]
    for profile in results['profiles']:
        families = {row['family']: row for row in profile['families']}
        assert set(families) <= set(FAMILIES)
        assert sum(row['share']
                   for row in families.values()) == pytest.approx(100, abs=0.5)
        assert sum(row['ms'] for row in families.values()) == pytest.approx(
            profile['aten_ms'])
        assert families[GEMM]['gflops'] > 0 and families[GEMM]['floor_ms'] > 0
        assert families[ATTENTION]['gflops'] > 0
        assert profile['forward_ms'] > 0 and profile['profiled_ms'] > 0
        # the GEMM roofline: products, fused attention and convolutions
        rate = meta['matmul_gflops'][profile['dtype']]
        products = sum(families[family]['gflops']
                       for family in (GEMM, ATTENTION, 'convolution'))
        assert profile['roofline_ms'] == pytest.approx(products / rate * 1e3)
        alone = {row['family']: row for row in profile['alone']}
        assert {GEMM, ATTENTION} <= set(alone) <= set(FAMILIES)
        assert min(row['alone_ms'] for row in alone.values()) > 0
    assert json.loads(json.dumps(results)) == results
    table = markdown(results)
    assert table.count('| Family | ms | Share | Floor ms | × floor |') == 2
    assert table.count('| Family | In forward ms | Alone ms | × alone |') == 2
    assert '## Agent-PVT-T, 64×64, bfloat16' in table
    assert re.search(r'gelu_ float32 [\d.]+, bfloat16 [\d.]+ G elements/s',
                     table)


def test_family_times_add_up_ops_by_family():
    ops = [
        OpTime('aten::addmm', 3e-3, 2e-3),
        OpTime('aten::gelu', 1e-3, 1e-3),
        OpTime('aten::mm', 1e-3, 2e-3),
        OpTime('aten::view', 1e-6, 0.0),
    ]
    rows = family_times(ops)
    assert [row['family'] for row in rows] == [GEMM, 'activation', VIEW]
    gemm, activation, view = rows
    assert (gemm['in_forward_ms'], gemm['alone_ms']) == pytest.approx((4, 4))
    assert gemm['x_alone'] == pytest.approx(1.0)
    assert activation['x_alone'] == pytest.approx(1.0)
    assert view['alone_ms'] == 0 and view['x_alone'] is None


@records_dtypes
def test_profile_tool_writes_markdown_and_json(tmp_path, capsys):
    tool = load_tool('profile_backbones')
    out = tmp_path / 'profile.md'
    results = tool.main([
        'pvt_t', '--sizes', '32', '--matmul-size', '128', '--copy-mb', '4',
        '--threads', '1', '--warmup', '1', '--out',
        str(out)
    ])
    assert capsys.readouterr().out == out.read_text() + '\n'
    assert json.loads((tmp_path / 'profile.json').read_text()) == results
    assert [p['dtype'] for p in results['profiles']] == ['float32']
    assert '## PVT-T (mmdet), 32×32, float32' in out.read_text()


@pytest.mark.parametrize('argv, message', [
    (['pvt_t', '--dtype', 'int8'], "invalid choice: 'int8'"),
    (['pvt_t', '--dtype', 'bfloat16', 'bfloat16'], 'distinct'),
    (['resnet'], "invalid choice: 'resnet'"),
    (['pvt_t', '--calls', '0'], '--calls'),
    (['pvt_t', '--alone', '-1'], '--alone'),
])
def test_profile_tool_rejects_bad_options(argv, message, capsys):
    tool = load_tool('profile_backbones')
    with pytest.raises(SystemExit):
        tool.parse_args(argv)
    assert message in capsys.readouterr().err


class _EventWithoutDtypes:
    """A profiler event as PyTorch 2.6 to 2.10 make it."""

    def __init__(self, id, name, thread, start_us, end_us, input_shapes=None):
        pass


def test_profile_tool_stops_where_the_profiler_records_no_dtypes(
        monkeypatch, capsys):
    monkeypatch.setattr(profile_module, 'FunctionEvent', _EventWithoutDtypes)
    tool = load_tool('profile_backbones')
    with pytest.raises(SystemExit) as exit_:
        tool.parse_args(['pvt_t'])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "needs the dtypes of the ops' inputs" in error
    assert f'torch {torch.__version__}' in error and 'newer torch' in error
    with pytest.raises(RuntimeError, match='newer torch'):
        profile_module.run_profiles(
            profile_module.ProfileSettings(['pvt_t'], [(32, 32)],
                                           ['float32']))
