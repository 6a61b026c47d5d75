"""The bias folded into the dot products (agent_mm.models.folded_bias): the
same attention as the masked kernel, the module's factors reproduce its
maps, and eval folds only uncached bfloat16 maps that are wide enough."""
import pytest
import torch

import agent_mm.models.agent_attention as agent_attention_module
from agent_mm.models import AgentAttention
from agent_mm.models.folded_bias import (folded_bias_attention, folded_width,
                                         folds_bias)
from agent_mm.models.layers import biased_attention


@pytest.mark.parametrize('rank', [1, 8, 9])
@pytest.mark.parametrize('per_head', ['left', 'right'])
def test_folded_attention_equals_the_masked_kernel(rank, per_head):
    torch.manual_seed(0)
    heads, queries, keys, dims = 3, 10, 13, 8
    query = torch.randn(2, heads, queries, dims)
    key, value = (torch.randn(2, heads, keys, dims) for _ in range(2))
    left = torch.randn(*((heads, ) if per_head == 'left' else ()), queries,
                       rank)
    right = torch.randn(*((heads, ) if per_head == 'right' else ()), keys,
                        rank)
    expected = biased_attention(query, key, value,
                                left @ right.transpose(-2, -1), 0.3)
    out = folded_bias_attention(query, key, value, left, right, 0.3)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('dims, rank, width', [(64, 49, 128), (64, 9, 80),
                                               (64, 16, 80), (32, 49, 96),
                                               (8, 8, 16)])
def test_folded_width_rounds_up_to_the_pad_multiple(dims, rank, width):
    assert folded_width(dims, rank) == width


@pytest.mark.parametrize('agents, dims, rank, dtype, device, folds', [
    (784, 64, 49, torch.bfloat16, 'cpu', True),
    (512, 64, 49, torch.bfloat16, 'cpu', True),
    (511, 64, 49, torch.bfloat16, 'cpu', False),
    (256, 64, 16, torch.bfloat16, 'cpu', False),
    (784, 64, 49, torch.float32, 'cpu', False),
    (784, 64, 49, torch.float16, 'cpu', False),
    (784, 64, 49, torch.bfloat16, 'cuda', False),
])
def test_folds_only_wide_bfloat16_maps_on_the_cpu(agents, dims, rank, dtype,
                                                  device, folds):
    assert folds_bias(agents, dims, rank, dtype,
                      torch.device(device)) is folds


@pytest.mark.parametrize('hw', [(8, 8), (5, 11)])
def test_module_factors_multiply_to_its_maps(hw):
    torch.manual_seed(0)
    attn = AgentAttention(16, 2, pretrain_grid=(7, 7), agent_num=9,
                          agent_shape=(3, 4))
    agent_bias, token_bias = attn.biases(hw)
    grid, keys, queries = attn.folded_biases(hw)
    assert grid.shape == (12, 9)
    assert keys.shape == queries.shape == (2, hw[0] * hw[1], 9)
    torch.testing.assert_close(grid @ keys.transpose(1, 2), agent_bias,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(queries @ grid.t(), token_bias,
                               atol=1e-5, rtol=1e-5)


@pytest.fixture
def folded_calls(monkeypatch):
    """Counts the calls of folded_bias_attention made by AgentAttention."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].dtype)
        return folded_bias_attention(*args, **kwargs)

    monkeypatch.setattr(agent_attention_module, 'folded_bias_attention',
                        counted)
    return calls


def _wide_attention() -> AgentAttention:
    """A module whose 144 agents are 4.5 times its folded head size (8 +
    9, rounded up to 32)."""
    torch.manual_seed(0)
    return AgentAttention(16, 2, pretrain_grid=(7, 7), agent_num=9,
                          agent_shape=(12, 12)).eval()


def _forward(attn: AgentAttention, x: torch.Tensor, hw, dtype):
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype,
                                         enabled=dtype != torch.float32):
        return attn(x, hw)


def test_eval_folds_a_new_bfloat16_shape_then_caches_its_maps(folded_calls):
    attn = _wide_attention()
    hw = (16, 20)
    x = torch.randn(2, hw[0] * hw[1], 16)
    folded = _forward(attn, x, hw, torch.bfloat16)
    assert folded_calls == [torch.bfloat16] * 2  # both attentions
    assert len(attn.bias_cache) == 0

    # the second sighting builds the maps, caches them and uses them
    cached = _forward(attn, x, hw, torch.bfloat16)
    assert len(folded_calls) == 2
    assert attn.bias_cache.shapes == [hw]
    assert cached.dtype == folded.dtype == torch.bfloat16
    torch.testing.assert_close(folded, cached, atol=3e-2, rtol=3e-2)
    reference = _forward(attn, x, hw, torch.float32)
    torch.testing.assert_close(folded.float(), reference, atol=3e-2,
                               rtol=3e-2)


def test_eval_never_folds_float32_or_narrow_maps(folded_calls):
    attn = _wide_attention()
    hw = (16, 20)
    x = torch.randn(1, hw[0] * hw[1], 16)
    attn.bias_cache.max_shapes = 0  # every forward builds its maps
    _forward(attn, x, hw, torch.float32)
    narrow = AgentAttention(16, 2, pretrain_grid=(7, 7), agent_num=9,
                            agent_shape=(3, 4),
                            bias_cache_size=0).eval()
    _forward(narrow, x, hw, torch.bfloat16)
    assert folded_calls == []


def test_fold_biases_false_builds_the_maps(folded_calls):
    attn = _wide_attention()
    attn.fold_biases = False
    hw = (16, 20)
    _forward(attn, torch.randn(1, hw[0] * hw[1], 16), hw, torch.bfloat16)
    assert folded_calls == []
