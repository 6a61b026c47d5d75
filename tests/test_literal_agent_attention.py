"""The literal path (attn_impl='reference'): its biases are the fast path's
maps repeated over the batch, and it is selected by attn_impl alone."""
import pytest
import torch

from agent_mm.models import AgentAttention
from agent_mm.models.literal_agent_attention import (literal_attention,
                                                     literal_biases)


@pytest.mark.parametrize('hw', [(8, 8), (5, 11)])
def test_literal_biases_equal_the_fast_maps_for_every_image(hw):
    attn = AgentAttention(16, 2, pretrain_grid=(7, 7), agent_num=9,
                          agent_shape=(3, 4))
    agent_bias, token_bias = literal_biases(attn, hw, batch=3)
    fast_agent, fast_token = attn.biases(hw)
    assert agent_bias.shape == (3, 2, 12, hw[0] * hw[1])
    assert token_bias.shape == (3, 2, hw[0] * hw[1], 12)
    for image in range(3):
        torch.testing.assert_close(agent_bias[image], fast_agent,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(token_bias[image], fast_token,
                                   atol=1e-5, rtol=1e-5)


def test_literal_attention_is_softmax_of_biased_products():
    query, key, value = (torch.randn(2, 3, n, 4) for n in (5, 6, 6))
    bias = torch.randn(2, 3, 5, 6)
    weights = torch.softmax(0.5 * query @ key.transpose(-2, -1) + bias, -1)
    torch.testing.assert_close(
        literal_attention(query, key, value, bias, 0.5, torch.nn.Identity()),
        weights @ value)


def test_attn_impl_selects_the_path_with_the_same_numbers():
    settings = dict(pretrain_grid=(7, 7), agent_num=9,
                    bias_cache_admit_after=1)
    fast = AgentAttention(16, 2, **settings).eval()
    literal = AgentAttention(16, 2, attn_impl='reference', **settings).eval()
    literal.load_state_dict(fast.state_dict())
    x = torch.randn(2, 48, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, (6, 8)), literal(x, (6, 8)),
                                   atol=1e-5, rtol=1e-5)
    assert not literal.bias_cache and fast.bias_cache.shapes == [(6, 8)]


def test_qk_scale_replaces_the_default_scale_on_both_paths():
    default = AgentAttention(16, 2, pretrain_grid=(7, 7), agent_num=9)
    assert default.scale == 8**-0.5
    x = torch.randn(1, 48, 16)
    outs = []
    for impl in ('fast', 'reference'):
        scaled = AgentAttention(16, 2, pretrain_grid=(7, 7), agent_num=9,
                                qk_scale=0.1, attn_impl=impl).eval()
        scaled.load_state_dict(default.state_dict())
        assert scaled.scale == 0.1
        with torch.no_grad():
            outs.append(scaled(x, (6, 8)))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(outs[0], default.eval()(x, (6, 8)))
    with pytest.raises(ValueError, match='qk_scale'):
        AgentAttention(16, 2, pretrain_grid=(7, 7), qk_scale=-1.)
