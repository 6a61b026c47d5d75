"""The analysis tools: backbone benchmark, FLOP handles and get_flops.

Only structure and counts are checked, never timings (the machine is
noisy).
"""
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from agent_mm.benchmark.models import MODELS
from agent_mm.benchmark.run import Settings
from agent_mm.benchmark.targets import TARGETS, target_ratios
from agent_mm.models import AgentAttention
from agent_mm.utils.flops import flop_analyzer

TOOLS = Path(__file__).resolve().parents[1] / 'tools' / 'analysis_tools'


def load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Attend(nn.Module):
    """``F.scaled_dot_product_attention`` of its three inputs."""

    def forward(self, query, key, value):
        return F.scaled_dot_product_attention(query, key, value)


class OnGrid(nn.Module):
    """An attention module run on a fixed token grid (traceable)."""

    def __init__(self, attn: nn.Module, hw_shape):
        super().__init__()
        self.attn = attn
        self.hw_shape = hw_shape

    def forward(self, x):
        return self.attn(x, self.hw_shape)


@pytest.mark.parametrize('value_dims', [4, 6])
def test_sdpa_handle_counts_both_matmuls(value_dims):
    batch, heads, len_q, len_k, dims = 2, 3, 5, 7, 4
    inputs = (torch.randn(batch, heads, len_q,
                          dims), torch.randn(batch, heads, len_k, dims),
              torch.randn(batch, heads, len_k, value_dims))
    analyzer = flop_analyzer(Attend(), inputs)
    expected = batch * heads * len_q * len_k * (dims + value_dims)
    assert analyzer.total() == expected
    if value_dims == dims:
        assert expected == 2 * batch * heads * len_q * len_k * dims
    assert not analyzer.unsupported_ops()


def test_flops_of_agent_attention_are_those_of_the_literal_computation():
    # counting traces the model, where agent attention takes its export
    # branch: the fast path is counted as the literal equations
    batch, heads, agents, tokens, head_dims = 2, 2, 12, 48, 32
    x = torch.randn(batch, tokens, heads * head_dims)
    counts = {}
    for impl in ('fast', 'reference'):
        attn = AgentAttention(
            heads * head_dims,
            heads,
            pretrain_grid=(7, 7),
            agent_num=9,
            agent_shape=(3, 4),
            attn_impl=impl).eval()
        with torch.no_grad():
            analyzer = flop_analyzer(OnGrid(attn, (8, 6)), (x, ))
            counts[impl] = (analyzer.total(), analyzer.by_operator())
    assert counts['fast'] == counts['reference']
    by_operator = counts['fast'][1]
    # agents <- tokens and tokens <- agents, each 2*B*heads*Lq*Lk*d
    attention = 2 * (2 * batch * heads * agents * tokens * head_dims)
    assert by_operator.pop('matmul') == attention
    # the biases are interpolated; the agents pooled with products
    assert by_operator.pop('upsample_bilinear2d') > 0
    assert by_operator.pop('bmm') > 0


def test_benchmark_tiny_run(tmp_path, capsys):
    bench = load_tool('benchmark_backbones')
    results = bench.main([
        '--sizes', '32', '--train-sizes', '32', '--scaling-sizes', '32',
        '64', '--repeats', '1', '--warmup', '0', '--threads', '1',
        '--matmul-size', '48', '--out-dir',
        str(tmp_path)
    ])
    table = (tmp_path / 'benchmark.md').read_text()
    saved = json.loads((tmp_path / 'benchmark.json').read_text())
    assert (tmp_path / 'latency_vs_tokens.png').stat().st_size > 0
    assert saved == json.loads(json.dumps(results))
    assert capsys.readouterr().out == table + '\n'
    assert set(saved['params']) == set(MODELS)
    for mode in ('eval', 'train'):
        assert {row['model'] for row in saved[mode]} == set(MODELS)
    assert all(spec.label in table for spec in MODELS.values())
    # the roofline's rate is that of the product of the asked size
    assert saved['meta']['matmul_size'] == 48
    assert 'the rate of a 48³ torch.mm' in table
    for row in saved['eval']:
        assert row['flops'] > 0 and row['peak_mb'] > 0
        assert len(row['times_ms']) == 1
    # the memory each timed call faulted in, counted on Linux
    assert all(row['fault_mb'] >= 0 for mode in ('eval', 'train')
               for row in saved[mode])
    checks = saved['flop_checks']
    assert len(checks) == 3 and all(check['ok'] for check in checks)
    diffs = saved['output_max_abs_diff']
    assert set(diffs) == {'agent_pvt_t', 'agent_pvt_s', 'agent_swin_t'}
    assert all(d < 1e-3 for d in diffs.values())
    scaling = saved['scaling']
    assert scaling['sizes'] == [[32, 32], [64, 64]]
    assert [len(t) for t in scaling['times_ms'].values()] == [1, 1]
    first, second = scaling['median_ms']
    assert scaling['ratio'] == pytest.approx(second / first)
    assert '## Scaling' in table
    # the target is the 2048² / 1024² ratio, not that of other sizes
    assert saved['ratios']['pvt_t_time_2048_over_1024'] is None


def test_scaling_target_is_read_from_the_interleaved_pair():
    scaling = dict(sizes=[[1024, 1024], [2048, 2048]], ratio=4.2)
    ratios = target_ratios([], [], scaling)
    assert ratios['pvt_t_time_2048_over_1024'] == 4.2
    assert target_ratios([], [],
                         None)['pvt_t_time_2048_over_1024'] is None


@pytest.mark.parametrize('sizes', [['1024'], ['64', '64'],
                                   ['32', '64', '96']])
def test_scaling_sizes_must_be_two_different_sizes(sizes):
    bench = load_tool('benchmark_backbones')
    with pytest.raises(SystemExit):
        bench.parse_args(['--scaling-sizes', *sizes])


def test_benchmark_max_tokens_skips_large_inputs(tmp_path):
    bench = load_tool('benchmark_backbones')
    results = bench.main([
        '--models', 'agent_pvt_t', 'pvt_t', '--sizes', '32', '64',
        '--train-sizes', '64', '--repeats', '1', '--warmup', '0',
        '--threads', '1', '--max-tokens', 'pvt_t=64', 'agent_pvt_t=256',
        '--scaling-sizes', '32', '128', '--out-dir',
        str(tmp_path)
    ])
    # 128² has 1024 tokens, above agent_pvt_t's limit
    assert 'scaling' not in results
    measured = {(row['model'], row['size'][0]) for row in results['eval']}
    assert measured == {('agent_pvt_t', 32), ('agent_pvt_t', 64),
                        ('pvt_t', 32)}
    assert [row['model'] for row in results['train']] == ['agent_pvt_t']
    assert {(s['model'], s['mode']) for s in results['skipped']} == {
        ('pvt_t', 'eval'), ('pvt_t', 'train')
    }
    assert 'Skipped (eval, --max-tokens)' in (tmp_path /
                                              'benchmark.md').read_text()


def test_max_tokens_names_a_benchmarked_model():
    bench = load_tool('benchmark_backbones')
    with pytest.raises(SystemExit):
        bench.parse_args(['--max-tokens', 'resnet=64'])


@pytest.mark.parametrize('tool, args', [('benchmark_backbones', []),
                                        ('profile_backbones', ['pvt_t'])])
def test_matmul_size_must_be_positive(tool, args, capsys):
    with pytest.raises(SystemExit):
        load_tool(tool).parse_args(args + ['--matmul-size', '0'])
    assert '--matmul-size: must be ≥ 1, got 0' in capsys.readouterr().err


def test_command_line_settings_carry_every_option():
    bench = load_tool('benchmark_backbones')
    args = bench.parse_args(['--max-tokens', 'pvt_s=64', '--sizes', '64x96',
                             '--matmul-size', '512'])
    settings = bench.settings_of(args)
    assert settings.matmul_size == 512
    assert set(vars(args)) == set(vars(settings)) | {'out_dir'}
    assert settings.max_tokens == {'pvt_s': 64}
    assert settings.sizes == [(64, 96)]
    assert settings.scaling_sizes == [(1024, 1024), (2048, 2048)]
    assert settings.dtypes == ['float32']
    assert settings.models == list(MODELS)
    assert isinstance(settings, Settings)


def test_default_sizes_measure_every_targets_size():
    """A run with the default sizes reads every target that names a size
    (none left at n/a for want of its input size)."""
    args = load_tool('benchmark_backbones').parse_args([])
    measured = {'eval': set(args.sizes), 'train': set(args.train_sizes)}
    for target in TARGETS:
        size = getattr(target.value, 'size', None)
        if size is not None:
            mode = getattr(target.value, 'mode', 'eval')
            assert tuple(size) in measured[mode], target.key


TINY_SEG_CONFIG = """
default_scope = 'mmseg'
custom_imports = dict(imports=['agent_mm'], allow_failed_imports=False)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor'),
    backbone=dict(
        type='AgentPVT',
        arch=dict(
            embed_dims=[8, 16, 24, 32], depths=[1, 1, 1, 1],
            num_heads=[1, 2, 2, 4], mlp_ratios=[2, 2, 2, 2],
            sr_ratios=[8, 4, 2, 1], agent_num=[4, 4, 9, 9],
            agent_shapes=[(3, 3), (3, 3), (2, 2), (2, 2)],
            attn_type='AAAA'),
        init_cfg=dict(type='Pretrained', checkpoint='missing.pth')),
    decode_head=dict(
        type='FCNHead', in_channels=32, in_index=3, channels=8,
        num_convs=1, num_classes=3, norm_cfg=dict(type='SyncBN'),
        loss_decode=dict(type='CrossEntropyLoss')),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
"""


def test_get_flops_on_tiny_segmentor(tmp_path, capsys):
    config = tmp_path / 'tiny_seg.py'
    config.write_text(TINY_SEG_CONFIG)
    get_flops = load_tool('get_flops')
    fast = get_flops.main([str(config), '--shape', '64', '96'])
    ref = get_flops.main([
        str(config), '--shape', '64', '96', '--cfg-options',
        'model.backbone.attn_impl=reference'
    ])
    assert fast['shape'] == [64, 96]
    assert fast['params'] == ref['params'] > 0
    assert [name for name, _ in fast['flops_by_part']
            ] == ['backbone', 'decode_head']
    # the paths differ only in how the biases are resized (interpolation vs
    # matrix products), a large share of this tiny model's FLOPs
    assert fast['flops'] == pytest.approx(ref['flops'], rel=0.1)
    assert 'FLOPs:' in capsys.readouterr().out


def test_get_flops_scope_defaults_to_mmdet(tmp_path):
    load_config = load_tool('get_flops').load_config
    config = tmp_path / 'no_scope.py'
    config.write_text(TINY_SEG_CONFIG.replace("default_scope = 'mmseg'", ''))
    assert load_config(str(config), None)[1] == 'mmdet'
    config.write_text(TINY_SEG_CONFIG.replace("'mmseg'", "'mmpretrain'"))
    with pytest.raises(ValueError, match="got 'mmpretrain'; set "
                       'default_scope in the config'):
        load_config(str(config), None)


@pytest.mark.parametrize('lacks_amx, dtype', [(True, 'bfloat16'),
                                              (False, 'bfloat16'),
                                              (False, 'float32')])
def test_blocked_attention_tool_prints_a_row_per_model_and_size(
        monkeypatch, capsys, lacks_amx, dtype):
    # the blocked column runs the blocks also on a CPU whose models would
    # not choose them
    from agent_mm.ops import blocked_attention
    monkeypatch.setattr(blocked_attention, 'cpu_lacks_amx_for_bfloat16',
                        lambda: lacks_amx)
    calls = []
    attend = blocked_attention.blocked_attention

    def counted(*args):
        # off by one: the table's difference must be that of the blocks
        calls.append(args)
        return attend(*args) + 1

    monkeypatch.setattr('agent_mm.models.agent_attention.blocked_attention',
                        counted)
    tool = load_tool('benchmark_blocked_attention')
    tool.main(['--models', 'agent_pvt_t', 'agent_swin_t', '--sizes', '64',
               '64x96', '--repeats', '1', '--threads', '1', '--dtype', dtype])
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith('| Agent-')]
    assert [row.split(' | ')[:2] for row in rows] == [
        ['| Agent-PVT-T', '64×64'], ['| Agent-PVT-T', '64×96'],
        ['| Agent-Swin-T', '64×64'], ['| Agent-Swin-T', '64×96']]
    assert all(float(row.split(' | ')[5]) > 0 for row in rows)
    assert calls  # the blocked column ran the blocks
    assert all(float(row.split(' | ')[6].rstrip(' |')) > 0.01
               for row in rows)


def test_bias_map_tool_compares_the_builds_of_every_attention(
        maps_by_rows, capsys):
    # (maps this small are one dense product unless built separably)
    tool = load_tool('benchmark_bias_maps')
    tool.main(['--models', 'agent_pvt_t', 'agent_swin_t', '--sizes', '64',
               '64x96', '--repeats', '1', '--threads', '1'])
    rows = [line.split(' | ') for line in capsys.readouterr().out.splitlines()
            if line.startswith('| Agent-')]
    assert [row[:2] for row in rows] == [
        ['| Agent-PVT-T', '64×64'], ['| Agent-PVT-T', '64×96'],
        ['| Agent-Swin-T', '64×64'], ['| Agent-Swin-T', '64×96']]
    assert all(float(row[2]) > 0 and float(row[5]) > 0 for row in rows)
    # the model's build wrote its token-major maps by rows, and the two
    # builds agree
    assert maps_by_rows
    assert all(float(row[8].rstrip(' |')) < 1e-5 for row in rows)


def test_freed_memory_tool_alternates_processes_and_reports_ratios(capsys):
    tool = load_tool('benchmark_freed_memory')
    tool.main(['--models', 'agent_pvt_t', '--size', '64', '--pairs', '1',
               '--warmup', '1', '--repeats', '1', '--threads', '1'])
    rows = [line.split(' | ') for line in capsys.readouterr().out.splitlines()
            if line.startswith('| agent_')]
    assert [row[0] for row in rows] == ['| agent_pvt_t']
    as_it_comes, kept, ratio = (float(cell) for cell in rows[0][1:4])
    # the ratio of the unrounded times: within what the cells' rounding to
    # whole milliseconds (and the ratio's to hundredths) allows
    lowest = (kept - .5) / (as_it_comes + .5) - .005
    highest = (kept + .5) / max(as_it_comes - .5, .5) + .005
    assert lowest <= ratio <= highest


def test_freed_memory_tool_alternates_the_settings_in_every_pair(
        monkeypatch, capsys):
    tool = load_tool('benchmark_freed_memory')
    started = []  # (model, setting) of each child process, in order
    monkeypatch.setattr(
        tool, 'run_child', lambda args, model, setting: started.append(
            (model, setting)) or dict(ms=1., faults=0))
    tool.main(['--models', 'agent_pvt_t', 'swin_t', '--pairs', '2'])
    pair = [(model, setting) for model in ('agent_pvt_t', 'swin_t')
            for setting in (tool.AS_IT_COMES, tool.KEPT)]
    assert started == pair * 2
    assert '| swin_t | 1 | 1 | 1.00 |' in capsys.readouterr().out


def test_freed_memory_report_takes_the_medians_over_pairs():
    tool = load_tool('benchmark_freed_memory')
    args = tool.parse_args(['--models', 'agent_pvt_t', '--pairs', '3'])
    runs = {'agent_pvt_t': {
        tool.AS_IT_COMES: [dict(ms=ms, faults=9000) for ms in (100, 300, 120)],
        tool.KEPT: [dict(ms=ms, faults=3) for ms in (90, 60, 400)]}}
    row = tool.report(args, runs).splitlines()[-1]
    assert row == '| agent_pvt_t | 120 | 90 | 0.75 | 9000 | 3 |'


def test_freed_memory_child_refuses_to_measure_what_it_cannot_keep(
        monkeypatch):
    tool = load_tool('benchmark_freed_memory')
    monkeypatch.setattr(tool, 'keep_freed_memory', lambda: False)
    args = tool.parse_args(['--child', tool.KEPT, '--size', '32'])
    args.model = 'agent_pvt_t'
    with pytest.raises(SystemExit, match='cannot be kept'):
        tool.measure_in_this_process(args)


def test_freed_memory_child_times_training_steps_of_the_batch(monkeypatch):
    tool = load_tool('benchmark_freed_memory')
    made = []

    def train_step(model, inputs):
        made.append((model.training, tuple(inputs.shape)))
        return lambda: None

    monkeypatch.setattr(tool, 'train_step', train_step)
    args = tool.parse_args([
        '--child', tool.AS_IT_COMES, '--size', '32x48', '--batch', '2',
        '--train', '--warmup', '0', '--repeats', '1'
    ])
    args.model = 'agent_pvt_t'
    tool.measure_in_this_process(args)
    assert made == [(True, (2, 3, 32, 48))]


def test_freed_memory_children_inherit_batch_and_training():
    tool = load_tool('benchmark_freed_memory')
    args = tool.parse_args(['--size', '32', '--batch', '4', '--train'])
    child = tool.parse_args(
        tool.child_command(args, 'agent_pvt_t', tool.KEPT)[2:])
    assert (child.child, child.models) == (tool.KEPT, ['agent_pvt_t'])
    assert (child.batch, child.train, child.size) == (4, True, (32, 32))
    assert 'timed training steps' in tool.report(args, {}).splitlines()[0]
    evaluating = tool.parse_args(['--size', '32'])
    assert not tool.parse_args(
        tool.child_command(evaluating, 'agent_pvt_t', tool.KEPT)[2:]).train
