"""The benchmark's targets and report, from fixed fake results.

Nothing is measured here: the rows are typed in, so the ratios and the
markdown can be checked exactly.
"""
import json

import pytest

from agent_mm.benchmark.models import DTYPES, MODELS
from agent_mm.benchmark.report import (SHORT_DTYPES, markdown, ratio_lines,
                                       write_report)
from agent_mm.benchmark.targets import (TARGETS, RooflineShare, RowRatio,
                                        Target, find_row, flop_checks,
                                        precision_ratios, ratio,
                                        roofline_share, rows_in, target_ratios)

S1024, S512 = [1024, 1024], [512, 512]
SCALING = dict(
    model='agent_pvt_t',
    sizes=[[1024, 1024], [2048, 2048]],
    dtype='float32',
    times_ms={
        '1024×1024': [400.0],
        '2048×2048': [1700.0]
    },
    median_ms=[400.0, 1700.0],
    ratio=4.25)


def row(model, size, median_ms, peak_mb, dtype='float32', **extras):
    """A measured row with one timed call."""
    return dict(
        model=model,
        size=size,
        dtype=dtype,
        batch=2 if size == S512 else 1,
        tokens=size[0] * size[1] // 16,
        times_ms=[median_ms],
        median_ms=median_ms,
        peak_mb=peak_mb,
        **extras)


def eval_row(model,
             median_ms,
             peak_mb,
             cache_mb,
             gflops,
             layer_gflops,
             fault_mb=None,
             matmul_gflops=None):
    """An eval row at 1024²; FLOPs in G (None: not counted); without
    ``fault_mb`` or ``matmul_gflops`` when None, like the results of runs
    before they were measured."""
    flops = None if gflops is None else gflops * 1e9
    layer = None if layer_gflops is None else layer_gflops * 1e9
    extras = {} if fault_mb is None else dict(fault_mb=fault_mb)
    if matmul_gflops is not None:
        extras['matmul_gflops'] = matmul_gflops
    return row(
        model,
        S1024,
        median_ms,
        peak_mb,
        **extras,
        bias_cache_mb=cache_mb,
        flops=flops,
        layer_flops=layer,
        unsupported_ops=None if flops is None else [])


# the products' rate: Agent-PVT-T's 62.8 G multiply-adds take 200 ms at it
RATE = 628.0
EVAL_ROWS = [
    eval_row('agent_pvt_t', 400.0, 100.0, 600.0, 62.8, 41.0, 12.4, RATE),
    eval_row('agent_pvt_t_ref', 1000.0, 300.0, 0.0, 62.9, 40.0, 250.0,
             RATE),
    eval_row('agent_pvt_s', 900.0, 120.0, 1300.0, None, None, 0.0, RATE),
    eval_row('pvt_s', 3000.0, 600.0, 0.0, 139.2, 139.2),
]
TRAIN_ROWS = [
    row('agent_pvt_t', S512, 2500.0, 800.0, fault_mb=64.0),
    row('agent_pvt_t_ref', S512, 2000.0, 1000.0, fault_mb=96.6),
]
RATIOS = {
    'pvt_t_eval_time_fast_over_ref': 0.4,
    'pvt_t_eval_mem_fast_over_ref': 1 / 3,
    'pvt_t_train_time_fast_over_ref': 1.25,
    'pvt_t_train_mem_fast_over_ref': 0.8,
    'pvt_t_eval_roofline_share_fp32': 0.5,
    'pvt_t_eval_time_bf16_over_fp32': None,
    'pvt_t_train_time_bf16_over_fp32': None,
    'swin_t_time_agent_over_mmdet': None,
    'pvt_t_time_2048_over_1024': 4.25,
    'pvt_s_time_agent_over_mmdet': 0.3,
}


def test_targets_name_each_key_and_description_once():
    keys = [target.key for target in TARGETS]
    descriptions = [target.description for target in TARGETS]
    assert len(set(keys)) == len(keys) == 10
    assert len(set(descriptions)) == len(descriptions)
    assert all(target.bound > 0 for target in TARGETS)
    assert target_ratios([], [], None) == dict.fromkeys(keys)


def test_row_ratios_compare_benchmarked_models():
    row_ratios = [t.value for t in TARGETS if isinstance(t.value, RowRatio)]
    assert len(row_ratios) == 6
    for value in row_ratios:
        assert {value.numerator, value.denominator} <= set(MODELS)
        assert value.mode in ('eval', 'train')


def test_target_ratios_of_one_run():
    ratios = target_ratios(EVAL_ROWS, TRAIN_ROWS, SCALING)
    assert ratios == pytest.approx(RATIOS)
    assert list(ratios) == list(RATIOS)


def test_targets_read_models_in_one_precision_and_both_for_bf16_over_fp32():
    swin = [
        row('agent_swin_t', [800, 1344], 700.0, 200.0),
        row('swin_t', [800, 1344], 1000.0, 300.0)
    ]
    eval_rows = (
        EVAL_ROWS + swin + in_bfloat16(EVAL_ROWS[:1], 2.5) +
        in_bfloat16(swin[:1], 2.0) + in_bfloat16(swin[1:], 1.4))
    train_rows = TRAIN_ROWS + in_bfloat16(TRAIN_ROWS[:1], 2.0)
    fp32 = target_ratios(eval_rows, train_rows, None)
    assert fp32['swin_t_time_agent_over_mmdet'] == pytest.approx(0.7)
    assert fp32['pvt_t_eval_time_fast_over_ref'] == pytest.approx(0.4)
    assert fp32['pvt_t_eval_time_bf16_over_fp32'] == pytest.approx(0.4)
    assert fp32['pvt_t_train_time_bf16_over_fp32'] == pytest.approx(0.5)
    bf16 = target_ratios(eval_rows, train_rows, None, 'bfloat16')
    assert bf16['swin_t_time_agent_over_mmdet'] == pytest.approx(0.7 / 2 *
                                                                 1.4)
    # no bfloat16 reference-path rows
    assert bf16['pvt_t_eval_time_fast_over_ref'] is None
    assert bf16['pvt_t_eval_time_bf16_over_fp32'] == pytest.approx(0.4)


def test_roofline_share_is_the_flops_at_the_rows_product_rate_over_its_time():
    fast, ref, no_flops, old_run = EVAL_ROWS
    assert roofline_share(fast) == pytest.approx(0.5)
    assert roofline_share(ref) == pytest.approx(62.9 / 628 * 2 / 1000 * 1e3)
    assert roofline_share(no_flops) is None
    assert roofline_share(old_run) is None
    assert roofline_share(dict(fast, matmul_gflops=0.0)) is None


def test_roofline_target_reads_the_float32_row_in_any_run():
    bf16 = with_bf16_rate(in_bfloat16(EVAL_ROWS[:1], 2.0))
    target = RooflineShare('agent_pvt_t', S1024)
    for dtype in ('float32', 'bfloat16'):
        ratios = target_ratios(EVAL_ROWS + bf16, [], None, dtype)
        assert ratios['pvt_t_eval_roofline_share_fp32'] == pytest.approx(0.5)
    assert target_ratios(bf16, [], None,
                         'bfloat16')['pvt_t_eval_roofline_share_fp32'] is None
    assert target.model in MODELS


def test_lower_and_upper_bounds():
    at_most = Target('a', 'a', 0.4, lambda run: None)
    at_least = Target('b', 'b', 0.65, lambda run: None, at_least=True)
    assert at_most.met(0.4) and not at_most.met(0.41)
    assert at_least.met(0.65) and not at_least.met(0.64)
    assert (at_most.bound_text(), at_least.bound_text()) == ('≤ 0.4',
                                                             '≥ 0.65')


def test_scaling_target_needs_the_1024_2048_pair():
    other = dict(SCALING, sizes=[[512, 512], [1024, 1024]])
    ratios = target_ratios(EVAL_ROWS, TRAIN_ROWS, other)
    assert ratios['pvt_t_time_2048_over_1024'] is None


def test_ratio_is_none_without_a_row_or_with_a_zero_denominator():
    fast, ref = ('agent_pvt_t', S1024), ('agent_pvt_t_ref', S1024)
    assert ratio(EVAL_ROWS, 'peak_mb', ref, fast) == 3.0
    assert ratio(EVAL_ROWS, 'peak_mb', fast, ('pvt_t', S1024)) is None
    assert ratio(EVAL_ROWS, 'peak_mb', fast, ('agent_pvt_t', S512)) is None
    # the reference path keeps no bias cache
    assert ratio(EVAL_ROWS, 'bias_cache_mb', fast, ref) is None
    assert ratio(EVAL_ROWS, 'bias_cache_mb', ref, fast) == 0.0


def test_find_row_matches_sizes_as_lists_or_tuples():
    assert find_row(EVAL_ROWS, 'pvt_s', (1024, 1024)) is EVAL_ROWS[3]
    assert find_row(EVAL_ROWS, 'pvt_s', [1024, 1024]) is EVAL_ROWS[3]
    assert find_row(EVAL_ROWS, 'pvt_s', (1024, 2048)) is None


def test_flop_checks_compare_layer_flops_of_each_reference_pair():
    rows = EVAL_ROWS + [
        dict(eval_row('agent_swin_t', 1, 1, 0, 30.0, 30.0), size=S512),
        dict(eval_row('agent_swin_t_ref', 1, 1, 0, 28.0, 28.0), size=S512),
        # no fast twin at this size, and one without FLOPs
        dict(eval_row('agent_swin_t_ref', 1, 1, 0, 28.0, 28.0), size=[8, 8]),
        eval_row('agent_pvt_s_ref', 1, 1, 0, 60.0, 40.0),
    ]
    checks = flop_checks(rows)
    assert [(c['model'], c['size'], c['ok']) for c in checks] == [
        ('agent_pvt_t', S1024, True), ('agent_swin_t', S512, False)
    ]
    assert checks[0]['fast_gflops'] == pytest.approx(41.0)
    assert checks[0]['reference_gflops'] == pytest.approx(40.0)
    assert checks[0]['relative_difference'] == pytest.approx(0.025)
    assert checks[1]['relative_difference'] == pytest.approx(2 / 28)
    assert flop_checks(rows, tolerance=0.1)[1]['ok']


def fake_results():
    """The results of a run, as saved to benchmark.json."""
    return dict(
        meta=dict(
            device='cpu',
            dtypes=['float32'],
            threads=2,
            torch='2.0.0',
            python='3.11.7',
            cpu_count=2,
            batch=1,
            train_batch=2,
            repeats=3,
            warmup=1,
            memory_method='replayed profiler events',
            load_avg_start=0.5,
            load_avg_end=1.5),
        params=dict(
            agent_pvt_t=11_060_000,
            agent_pvt_t_ref=11_060_000,
            agent_pvt_s=20_120_000,
            pvt_s=23_970_000),
        eval=EVAL_ROWS,
        train=TRAIN_ROWS,
        skipped=[dict(model='pvt_s', size=[2048, 2048], mode='eval')],
        output_max_abs_diff=dict(agent_pvt_t=5.48e-06),
        scaling=SCALING,
        ratios=dict(RATIOS, pvt_s_time_agent_over_mmdet=None),
        precision_ratios=[],
        flop_checks=[
            dict(
                model='agent_pvt_t',
                size=S1024,
                fast_gflops=41.0,
                reference_gflops=40.0,
                relative_difference=0.025,
                ok=True),
            dict(
                model='agent_swin_t',
                size=S512,
                fast_gflops=30.0,
                reference_gflops=28.0,
                relative_difference=2 / 28,
                ok=False),
        ])


EXPECTED_MARKDOWN = """\
# Backbone benchmark

cpu, float32, 2 threads, torch 2.0.0, median of 3 interleaved calls, \
each right after 1 untimed call(s) of the same model; \
load average 0.5 at start, 1.5 at end.
Peak memory: replayed profiler events
Faults: memory the kernel mapped into the process during a timed call \
(minor page faults × page size, median), i.e. freed memory that the C \
allocator returned to the kernel and that faults in again; its system \
time is part of the call.
FLOPs: mmengine FlopAnalyzer, one multiply-add = one flop, \
attention (SDPA/matmul) included.
MB: 2^20 bytes (MiB).
Roofline %: the GEMM roofline (the FLOPs at the rate of a 2048³ torch.mm \
in the row's precision, timed in the same rounds as the models) over the \
forward time; that rate, GFLOP/s: float32 628.

## Inference (eval, no_grad, batch 1)

| Model | Input | Dtype | Tokens | Params (M) | GFLOPs | Fwd ms (median) \
| Roofline % | Faults MB | Peak MB | Bias cache MB | × reference | × mmdet |
|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| Agent-PVT-T | 1024×1024 | float32 | 65536 | 11.06 | 62.8 | 400 | 50 \
| 12 | 100 | 600 | 0.40 | n/a |
| Agent-PVT-T (reference) | 1024×1024 | float32 | 65536 | 11.06 | 62.9 \
| 1000 | 20 | 250 | 300 | 0 | n/a | n/a |
| Agent-PVT-S | 1024×1024 | float32 | 65536 | 20.12 | n/a | 900 | n/a \
| 0 | 120 | 1300 | n/a | 0.30 |
| PVT-S (mmdet) | 1024×1024 | float32 | 65536 | 23.97 | 139.2 | 3000 \
| n/a | n/a | 600 | 0 | n/a | n/a |

## Training (train mode, forward + backward, batch 2)

| Model | Input | Dtype | Batch | Fwd+bwd ms (median) | Faults MB \
| Peak MB | × reference | × mmdet |
|---|---|---|---:|---:|---:|---:|---:|---:|
| Agent-PVT-T | 512×512 | float32 | 2 | 2500 | 64 | 800 | 1.25 | n/a |
| Agent-PVT-T (reference) | 512×512 | float32 | 2 | 2000 | 97 | 1000 \
| n/a | n/a |

## Scaling (the two sizes alternating, call by call)

Agent-PVT-T forward: 400 ms at 1024×1024, 1700 ms at 2048×2048, ratio 4.25

## Ratios

| Ratio (same run) | Value | Target | Met |
|---|---:|---:|---|
| Agent-PVT-T eval 1024²: fast / reference forward time | 0.400 | ≤ 0.5 \
| yes |
| Agent-PVT-T eval 1024²: fast / reference peak memory of a warm call \
(the fast path's bias cache, held between calls, apart) | 0.333 | ≤ 1.0 \
| yes |
| Agent-PVT-T train 512² (fwd+bwd): fast / reference time | 1.250 | ≤ 1.0 \
| NO |
| Agent-PVT-T train 512² (fwd+bwd): fast / reference peak memory \
| 0.800 | ≤ 0.75 | NO |
| Agent-PVT-T eval 1024², float32: GEMM roofline / forward time | 0.500 \
| ≥ 0.65 | NO |
| Agent-PVT-T eval 1024²: bfloat16 / float32 forward time | n/a | ≤ 0.4 \
| n/a |
| Agent-PVT-T train 512² (fwd+bwd): bfloat16 / float32 time | n/a | ≤ 0.6 \
| n/a |
| Agent-Swin-T / mmdet Swin-T forward time at 800×1344 | n/a | ≤ 0.8 \
| n/a |
| Agent-PVT-T forward time 2048² / 1024² (sizes alternating) | 4.250 \
| ≤ 4.5 | yes |
| Agent-PVT-S (fast) / mmdet PVT-S forward time at 1024² | n/a | ≤ 1.0 \
| n/a |

## Checks

- Same network (FLOPs outside attention and resizing), Agent-PVT-T 1024×1024: \
fast 41.00 G, reference 40.00 G (+2.50%, ok)
- Same network (FLOPs outside attention and resizing), Agent-Swin-T 512×512: \
fast 30.00 G, reference 28.00 G (+7.14%, OUTSIDE ±5%)
- Skipped (eval, --max-tokens): PVT-S (mmdet) at 2048×2048
- Outputs Agent-PVT-T fast vs reference: max |Δ| = 5.48e-06
"""


def test_markdown_report_of_fixed_results():
    assert markdown(fake_results()) == EXPECTED_MARKDOWN


def test_header_names_the_untimed_round_where_the_run_had_one():
    results = fake_results()
    results['meta'] = dict(results['meta'], untimed_round=True)
    expected = EXPECTED_MARKDOWN.replace(
        'interleaved calls, each right after',
        'interleaved calls, after an untimed round of every model, each '
        'right after')
    assert markdown(results) == expected


def test_header_says_a_run_without_untimed_calls_times_cold_calls():
    results = fake_results()
    results['meta'] = dict(results['meta'], warmup=0)
    text = markdown(results)
    assert ('each right after 0 untimed call(s) of the same model (so the '
            'first timed calls of a fast model also build its bias maps'
            in text)
    assert 'also build its bias maps' not in markdown(fake_results())


def test_markdown_leaves_out_sections_not_measured():
    results = dict(fake_results(), train=[])
    del results['scaling']
    start = EXPECTED_MARKDOWN.index('\n## Training')
    end = EXPECTED_MARKDOWN.index('\n## Ratios')
    expected = EXPECTED_MARKDOWN[:start] + EXPECTED_MARKDOWN[end:]
    assert markdown(results) == expected
    assert '## Training' not in expected and '## Scaling' not in expected


def test_markdown_of_results_saved_before_the_product_rate():
    results = fake_results()
    results['eval'] = [{
        key: value
        for key, value in row.items() if key != 'matmul_gflops'
    } for row in EVAL_ROWS]
    table = markdown(results)
    assert 'Roofline %:' not in table and 'Roofline %:' in EXPECTED_MARKDOWN
    assert ('| Agent-PVT-T | 1024×1024 | float32 | 65536 | 11.06 | 62.8 '
            '| 400 | n/a | 12 |') in table


def test_ratio_lines_follow_the_targets_order():
    lines = ratio_lines(dict.fromkeys(t.key for t in TARGETS))
    assert len(lines) == 2 + len(TARGETS)
    assert all(line.endswith(f'| n/a | {target.bound_text()} | n/a |')
               for line, target in zip(lines[2:], TARGETS))


def test_write_report_writes_json_markdown_and_plot(tmp_path):
    results = fake_results()
    table = write_report(results, str(tmp_path))
    assert table == EXPECTED_MARKDOWN
    assert (tmp_path / 'benchmark.md').read_text() == table
    saved = json.loads((tmp_path / 'benchmark.json').read_text())
    assert saved == results
    assert (tmp_path / 'latency_vs_tokens.png').stat().st_size > 0


def in_bfloat16(rows, speedup):
    """Copies of float32 rows as bfloat16 rows ``speedup`` times faster."""
    return [
        dict(
            row,
            dtype='bfloat16',
            times_ms=[t / speedup for t in row['times_ms']],
            median_ms=row['median_ms'] / speedup) for row in rows
    ]


def with_bf16_rate(rows):
    """``rows`` with the bfloat16 product rate, 4 times float32's."""
    return [dict(row, matmul_gflops=4 * RATE) for row in rows]


def test_precision_ratios_pair_rows_with_their_float32_twin():
    rows = EVAL_ROWS[:2] + in_bfloat16(EVAL_ROWS[:1], 2.0) + [
        row('pvt_s', S1024, 50.0, 1.0, dtype='float16')  # no float32 row
    ]
    assert precision_ratios(rows, 'eval') == [
        dict(
            mode='eval',
            model='agent_pvt_t',
            size=S1024,
            dtype='bfloat16',
            float32_ms=400.0,
            median_ms=200.0,
            ratio=0.5)
    ]
    assert precision_ratios(EVAL_ROWS, 'eval') == []
    assert rows_in(rows, 'float16') == rows[-1:]
    assert set(SHORT_DTYPES) == set(DTYPES)


def two_precision_results():
    """The fake results with every row also run in bfloat16."""
    results = fake_results()
    results['meta']['dtypes'] = ['float32', 'bfloat16']
    results['eval'] = EVAL_ROWS + with_bf16_rate(in_bfloat16(EVAL_ROWS[:2],
                                                             2.5))
    results['train'] = TRAIN_ROWS + in_bfloat16(TRAIN_ROWS, 1.25)
    results['precision_ratios'] = (
        precision_ratios(results['eval'], 'eval') +
        precision_ratios(results['train'], 'train'))
    results['ratios'] = target_ratios(results['eval'], results['train'],
                                      results['scaling'])
    return results


def test_markdown_of_two_precisions():
    table = markdown(two_precision_results())
    assert ('cpu, float32 + bfloat16 (bfloat16 under torch.autocast, '
            'float32 parameters), 2 threads') in table
    # the bfloat16 row is compared with the bfloat16 reference row
    # its roofline at the bfloat16 rate: 50 ms of 160
    assert ('| Agent-PVT-T | 1024×1024 | bfloat16 | 65536 | 11.06 | 62.8 '
            '| 160 | 31 | 12 | 100 | 600 | 0.40 | n/a |') in table
    assert 'GFLOP/s: float32 628, bfloat16 2512.' in table
    assert ('| Agent-PVT-T | 512×512 | bfloat16 | 2 | 2000 | 64 | 800 '
            '| 1.25 | n/a |') in table
    section = """
## bf16 / fp32 time (same model, input and mode)

| Mode | Model | Input | fp32 ms (median) | bf16 ms (median) | bf16 / fp32 |
|---|---|---|---:|---:|---:|
| eval | Agent-PVT-T | 1024×1024 | 400 | 160 | 0.40 |
| eval | Agent-PVT-T (reference) | 1024×1024 | 1000 | 400 | 0.40 |
| train | Agent-PVT-T | 512×512 | 2500 | 2000 | 0.80 |
| train | Agent-PVT-T (reference) | 512×512 | 2000 | 1600 | 0.80 |

## Scaling"""
    assert section in table
    note = ('Models compared from the float32 rows; bfloat16 / float32 from '
            'both.')
    assert f'## Ratios\n\n{note}\n\n| Ratio' in table
    assert note not in EXPECTED_MARKDOWN
    # the bf16 / fp32 targets read both precisions
    assert ('| Agent-PVT-T eval 1024²: bfloat16 / float32 forward time '
            '| 0.400 | ≤ 0.4 | yes |') in table
    assert ('| Agent-PVT-T train 512² (fwd+bwd): bfloat16 / float32 time '
            '| 0.800 | ≤ 0.6 | NO |') in table
    assert '## bf16 / fp32' not in EXPECTED_MARKDOWN


def test_report_of_two_precisions_writes_its_plot(tmp_path):
    write_report(two_precision_results(), str(tmp_path))
    assert (tmp_path / 'latency_vs_tokens.png').stat().st_size > 0
