"""The benchmark's precisions (``--dtype``), on tiny models and inputs.

Only structure and counts are checked, never timings (the machine is
noisy).
"""
import dataclasses

import pytest
import torch
from test_benchmark_measure import MATMUL, TIMING, TinyBackbone
from test_benchmark_tools import load_tool

import agent_mm.benchmark.measure as measure_module
from agent_mm.benchmark.measure import measure, precision_copies
from agent_mm.benchmark.models import (DTYPES, FLOAT32, Autocast, check_dtypes,
                                       in_precision)
from agent_mm.benchmark.run import run

CPU = torch.device('cpu')


def test_check_dtypes_names_the_value_and_the_choices():
    check_dtypes(['float32', 'bfloat16', 'float16'])
    with pytest.raises(ValueError,
                       match="'int8': choose from float32, bfloat16, float16"):
        check_dtypes(['float32', 'int8'])
    for repeated in ([], ['bfloat16', 'bfloat16']):
        with pytest.raises(ValueError, match='distinct'):
            check_dtypes(repeated)


@pytest.mark.parametrize('argv, message', [
    (['--dtype', 'int8'], "invalid choice: 'int8'"),
    (['--dtype', 'float32', 'float32'], 'distinct'),
])
def test_dtype_option_rejects_unknown_and_repeated_values(
        argv, message, capsys):
    bench = load_tool('benchmark_backbones')
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    error = capsys.readouterr().err
    assert message in error
    assert all(name in error for name in DTYPES)


def test_run_rejects_an_unknown_dtype():
    bench = load_tool('benchmark_backbones')
    settings = bench.settings_of(bench.parse_args(['--sizes', '32']))
    assert settings.dtypes == [FLOAT32]
    with pytest.raises(ValueError, match="'half'"):
        run(dataclasses.replace(settings, dtypes=['half']))


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_in_precision_autocasts_the_forward_only(dtype):
    model = TinyBackbone(attend=True)
    assert in_precision(model, FLOAT32, CPU) is model
    runner = in_precision(model, dtype, CPU)
    assert isinstance(runner, Autocast)
    (out, ) = runner(torch.randn(1, 3, 4, 4))
    assert out.dtype == DTYPES[dtype]
    out.float().sum().backward()
    assert all(p.dtype == p.grad.dtype == torch.float32
               for p in model.parameters())


@pytest.mark.parametrize('train', [False, True])
def test_measure_rows_carry_their_dtype(train):
    models = dict(one=TinyBackbone(), two=TinyBackbone(attend=True))
    rows = measure(models, (8, 8), 1, train, TIMING, dtypes=['bfloat16'],
                   matmul_size=MATMUL)
    assert [(row['model'], row['dtype']) for row in rows] == [
        ('one', 'bfloat16'), ('two', 'bfloat16')
    ]
    assert all(row['peak_mb'] > 0 for row in rows)
    assert measure(models, (8, 8), 1, train, TIMING,
                   matmul_size=MATMUL)[0]['dtype'] == FLOAT32


def test_precision_copies_give_later_precisions_models_of_their_own():
    models = dict(one=TinyBackbone(), two=TinyBackbone(attend=True))
    runs = precision_copies(models, ['float32', 'bfloat16', 'float16'])
    assert list(runs) == ['float32', 'bfloat16', 'float16']
    assert runs['float32'] is models
    for dtype in ('bfloat16', 'float16'):
        for key, model in models.items():
            twin = runs[dtype][key]
            assert twin is not model
            assert all(a is not b and torch.equal(a, b) for a, b in zip(
                twin.state_dict().values(),
                model.state_dict().values()))


@pytest.mark.parametrize('train', [False, True])
def test_measure_interleaves_the_precisions_call_by_call(train, monkeypatch):
    calls = []
    in_precision = measure_module.in_precision

    class Recording(torch.nn.Module):
        """The runner of ``model`` in ``dtype``, noting each call."""

        def __init__(self, model, dtype, device):
            super().__init__()
            self.runner = in_precision(model, dtype, device)
            self.call = (id(model), dtype)

        def forward(self, *args):
            calls.append(self.call)
            return self.runner(*args)

    monkeypatch.setattr(measure_module, 'in_precision', Recording)
    models = dict(one=TinyBackbone(attend=True))
    rows = measure(models, (8, 8), 1, train, TIMING,
                   dtypes=['float32', 'bfloat16'], matmul_size=MATMUL)
    assert [row['dtype'] for row in rows] == ['float32', 'bfloat16']
    # an untimed round, then each step's calls; then its peak memory
    timed = calls[:2 + 4 * TIMING.repeats]
    # one untimed and one timed call of each precision in turn, the order
    # rotating; bfloat16 runs a copy of the model, float32 the model
    fp32, bf16 = (id(models['one']), 'float32'), (timed[1][0], 'bfloat16')
    assert timed == [fp32, bf16, fp32, fp32, bf16, bf16, bf16, bf16, fp32,
                     fp32]
    assert bf16[0] != fp32[0]
    if not train:
        # FLOPs counted once, in the first precision, shared by the other
        assert rows[1]['flops'] == rows[0]['flops'] > 0


def test_benchmark_tiny_run_in_two_precisions(tmp_path, monkeypatch):
    counted = []
    count_flops = measure_module.count_flops
    monkeypatch.setattr(
        measure_module, 'count_flops',
        lambda model, inputs: counted.append(1) or count_flops(model, inputs))
    bench = load_tool('benchmark_backbones')
    results = bench.main([
        '--models', 'agent_pvt_t', 'agent_pvt_t_ref', '--sizes', '32',
        '--train-sizes', '32', '--scaling-sizes', '--repeats', '1',
        '--warmup', '0', '--threads', '1', '--dtype', 'float32', 'bfloat16',
        '--matmul-size', str(MATMUL), '--out-dir',
        str(tmp_path)
    ])
    assert results['meta']['dtypes'] == ['float32', 'bfloat16']
    pairs = [(m, d) for d in ('float32', 'bfloat16')
             for m in ('agent_pvt_t', 'agent_pvt_t_ref')]
    for mode in ('eval', 'train'):
        assert [(r['model'], r['dtype']) for r in results[mode]] == pairs
    # FLOPs are counted once per model and size, shared by the precisions
    assert len(counted) == 2
    fp32, bf16 = results['eval'][:2], results['eval'][2:]
    assert [r['flops'] for r in bf16] == [r['flops'] for r in fp32]
    assert all(r['flops'] > 0 for r in fp32)
    ratios = results['precision_ratios']
    assert [(r['mode'], r['model']) for r in ratios] == [
        (mode, model) for mode in ('eval', 'train')
        for model in ('agent_pvt_t', 'agent_pvt_t_ref')
    ]
    for entry, row in zip(ratios, bf16 + results['train'][2:]):
        assert entry['ratio'] == pytest.approx(row['median_ms'] /
                                               entry['float32_ms'])
    assert len(results['flop_checks']) == 1
    table = (tmp_path / 'benchmark.md').read_text()
    assert '## bf16 / fp32 time' in table
    assert '| Agent-PVT-T | 32×32 | bfloat16 |' in table
