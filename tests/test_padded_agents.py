"""Agents padded as keys (agent_mm.models.padded_agents): the rule, the
padded maps of either build, and an attention unchanged by the padding."""
import pytest
import torch

from agent_mm.models import AgentAttention, padded_agents
from agent_mm.models.bias_maps import separable_bias
from agent_mm.models.layers import biased_attention
from agent_mm.models.padded_agents import (PADDED_AGENT_BIAS, pad_agents,
                                           padded_agent_count)


@pytest.fixture(params=[False, True], ids=['amx', 'blocks'])
def blocks_cpu(request, monkeypatch) -> bool:
    """Whether this CPU is taken to run the blocked kernel (no AMX)."""
    monkeypatch.setattr(padded_agents, 'cpu_lacks_amx_for_bfloat16',
                        lambda: request.param)
    return request.param


@pytest.mark.parametrize('agents, fused_count, blocks_count', [
    (81, 96, 96),
    (144, 144, 160),
    (196, 208, 196),
    (784, 784, 800),
    (9, 16, 9),
    (16, 16, 32),
    (32, 32, 32),
    (1, 16, 1),
])
def test_pads_for_the_kernel_of_this_cpu_in_bfloat16(
        agents, fused_count, blocks_count, blocks_cpu):
    count = padded_agent_count(agents, torch.bfloat16, torch.device('cpu'))
    assert count == (blocks_count if blocks_cpu else fused_count)


@pytest.mark.parametrize('dtype, device', [
    (torch.float32, 'cpu'),
    (torch.float16, 'cpu'),
    (torch.bfloat16, 'cuda'),
])
def test_pads_only_in_bfloat16_on_the_cpu(dtype, device, blocks_cpu):
    for agents in (81, 144, 196):
        count = padded_agent_count(agents, dtype, torch.device(device))
        assert count == agents


def test_pad_agents_appends_zero_rows():
    x = torch.randn(2, 3, 5, 4)
    padded = pad_agents(x, 8)
    assert padded.shape == (2, 3, 8, 4)
    assert torch.equal(padded[..., :5, :], x)
    assert not padded[..., 5:, :].any()
    assert pad_agents(x, 5) is x


def test_pad_agents_appends_the_value_along_a_maps_last_dimension():
    bias = torch.randn(2, 6, 5)
    padded = pad_agents(bias, 8, dim=-1, value=PADDED_AGENT_BIAS)
    assert padded.shape == (2, 6, 8)
    assert torch.equal(padded[..., :5], bias)
    assert (padded[..., 5:] == PADDED_AGENT_BIAS).all()
    assert pad_agents(bias, 5, dim=-1, value=PADDED_AGENT_BIAS) is bias


def _sources(requires_grad: bool = False):
    """Sources of one bias (full 7×7, rows, columns) for 2 heads, 3×3 bias
    agents."""
    return [
        torch.randn(2, 9, *hw, requires_grad=requires_grad)
        for hw in ((7, 7), (14, 1), (1, 14))
    ]


@pytest.mark.parametrize('token_major', [False, True])
def test_padded_map_is_the_map_then_the_padded_bias(token_major, bias_build):
    sources = _sources(requires_grad=True)
    grids = (10, 13), (3, 3)
    bias = separable_bias(*sources, *grids, token_major)
    padded = separable_bias(*sources, *grids, token_major, agent_count=16)
    assert padded.is_contiguous()
    agent_dim = 2 if token_major else 1
    assert padded.shape[agent_dim] == 16
    real, extra = padded.split([9, 7], agent_dim)
    torch.testing.assert_close(real, bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(extra, torch.full_like(extra,
                                                      PADDED_AGENT_BIAS))
    # the padded agents depend on no source
    grad = torch.randn_like(bias)
    want = torch.autograd.grad(bias, sources, grad)
    got = torch.autograd.grad(real, sources, grad)
    for ours, expected in zip(got, want):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_padded_agents_get_no_weight():
    query = torch.randn(2, 2, 130, 8)
    agents, agent_value = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    sources, grids = _sources(), ((10, 13), (3, 3))
    bias = separable_bias(*sources, *grids, True)
    padded = separable_bias(*sources, *grids, True, agent_count=16)
    expected = biased_attention(query, agents, agent_value, bias, 0.3)
    out = biased_attention(query, pad_agents(agents, 16),
                           pad_agents(agent_value, 16), padded, 0.3)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def _forward(attn: AgentAttention, x: torch.Tensor, hw, dtype):
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype,
                                         enabled=dtype != torch.float32):
        return attn(x, hw)


def test_eval_pads_the_token_map_in_bfloat16_only():
    # 25 agents are padded to 32 on any CPU
    attn = AgentAttention(32, 2, pretrain_grid=(14, 14), agent_num=25,
                          agent_shape=(5, 5)).eval()
    hw = (10, 13)
    x = torch.randn(2, 130, 32)
    reference = _forward(attn, x, hw, torch.float32)
    _forward(attn, x, hw, torch.float32)
    assert attn.bias_cache.maps(hw)[1].shape == (2, 130, 25)

    first = _forward(attn, x, hw, torch.bfloat16)  # maps built for once
    cached = _forward(attn, x, hw, torch.bfloat16)
    agent_map, token_map = attn.bias_cache.maps(hw)
    assert agent_map.shape == (2, 25, 130)
    assert token_map.shape == (2, 130, 32)
    assert attn.key_agents() == 25  # outside autocast
    # the same padding whether the maps are cached or not
    assert torch.equal(first, cached)
    torch.testing.assert_close(cached.float(), reference, atol=3e-2,
                               rtol=3e-2)
