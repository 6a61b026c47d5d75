"""The attention-kernel comparison (agent_mm/benchmark/attention_kernels.py
and tools/analysis_tools/benchmark_attention_kernels.py)."""
import pytest
import torch
from test_benchmark_tools import load_tool

from agent_mm.benchmark.attention_kernels import (FUSED, KEY_CHUNKS, Problem,
                                                  compare_kernels, kernels_for,
                                                  model_problems,
                                                  problem_as_run,
                                                  problem_inputs)
from agent_mm.models import AgentPVT

CPU = torch.device('cpu')


def test_model_problems_are_both_attentions_of_every_stage():
    model = AgentPVT(
        arch='tiny', depths=[2, 1, 1, 1], init_cfg=None).eval()
    problems = model_problems(model, torch.randn(2, 3, 64, 96))
    # stage 1: 16×24 tokens, 12×12 agents, 1 head of 64 channels; blocks of
    # one stage share their problems
    assert problems[:2] == [
        Problem('agents <- tokens', 1, 144, 384, 64),
        Problem('tokens <- agents', 1, 384, 144, 64)
    ]
    assert len(problems) == 8
    assert [p.heads for p in problems[::2]] == [1, 2, 5, 8]
    assert [p.keys for p in problems[::2]] == [384, 96, 24, 6]


@pytest.mark.parametrize('problem', [
    Problem('agents <- tokens', 2, 9, 8 * KEY_CHUNKS, 16),
    Problem('tokens <- agents', 3, 40, 9, 8),
])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_every_kernel_computes_the_fused_attention(problem, dtype):
    inputs = problem_inputs(problem, dtype, CPU)
    scale = problem.head_dims**-0.5
    expected = FUSED(*inputs, scale).float()
    literal = torch.softmax(
        scale * inputs[0].float() @ inputs[1].float().transpose(-1, -2) +
        inputs[3].float(), -1) @ inputs[2].float()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(
        expected, literal, atol=tolerance, rtol=tolerance)
    kernels = kernels_for(problem, CPU)
    split = problem.keys > problem.queries
    assert (f'key split ×{KEY_CHUNKS}' in kernels) == split
    for kernel in kernels.values():
        out = kernel(*inputs, scale)
        assert out.shape == expected.shape and out.dtype == dtype
        torch.testing.assert_close(
            out.float(), expected, atol=tolerance, rtol=tolerance)


def test_compare_kernels_reports_each_kernel_against_the_fused_one():
    problem = Problem('agents <- tokens', 1, 4, 4 * KEY_CHUNKS, 8)
    results = compare_kernels(problem, torch.float32, repeats=2)
    assert set(results) == set(kernels_for(problem, CPU))
    assert results['fused']['vs_fused'] == 1
    assert results['fused']['max_diff'] == 0
    for row in results.values():
        assert row['ms'] > 0
        assert row['gflops'] == pytest.approx(problem.flops / row['ms'] / 1e6)
        assert row['max_diff'] < 1e-5


@pytest.mark.parametrize('dtype, keys', [(torch.bfloat16, 96),
                                         (torch.float32, 81)])
def test_problems_are_run_with_the_fast_paths_padded_agents(dtype, keys):
    # the fast path pads 81 agents as keys to 96 in bfloat16 on any CPU
    tokens_from_agents = Problem('tokens <- agents', 3, 400, 81, 32)
    agents_from_tokens = Problem('agents <- tokens', 3, 81, 400, 32)
    assert problem_as_run(tokens_from_agents, dtype, CPU).keys == keys
    assert problem_as_run(agents_from_tokens, dtype, CPU) == agents_from_tokens


def test_tool_times_the_product_of_the_asked_size(capsys):
    tool = load_tool('benchmark_attention_kernels')
    tool.main(['--size', '64', '--repeats', '1', '--threads', '1',
               '--matmul-size', '16'])
    out = capsys.readouterr().out
    assert 'matmul 16³ GFLOP/s in the same run: float32 ' in out
    # the table follows, both attentions of the stages
    assert '| agents <- tokens |' in out and '| tokens <- agents |' in out
