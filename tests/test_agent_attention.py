"""AgentAttention: fidelity to the spec, fast vs reference path, bias cache."""
import pytest
import torch
from reference_agent import ReferenceAgentAttention, randomize_

from agent_mm.models import AgentAttention
from agent_mm.models.agent_attention import (BIAS_CACHE_SIZE, BIAS_NAMES,
                                             left_matmul, mapped_source,
                                             pool_tokens, resize,
                                             resize_by_matmul, to_agent_grid)
from agent_mm.models.layers import map_to_tokens, tokens_to_map


def _pair(fused_qkv, attn_impl='fast', bias_cache_size=BIAS_CACHE_SIZE,
          **kwargs):
    settings = dict(
        dim=32,
        num_heads=2,
        agent_num=9,
        agent_shape=(4, 5),
        ref_size=(14, 14),
        fused_qkv=fused_qkv)
    settings.update(kwargs)
    reference = ReferenceAgentAttention(**settings)
    randomize_(reference, seed=1)
    module = AgentAttention(
        settings['dim'],
        settings['num_heads'],
        ref_size=settings['ref_size'],
        agent_num=settings['agent_num'],
        agent_shape=settings['agent_shape'],
        fused_qkv=fused_qkv,
        attn_impl=attn_impl,
        bias_cache_size=bias_cache_size)
    module.load_state_dict(reference.state_dict(), strict=True)
    return module.eval(), reference.eval()


@pytest.mark.parametrize('fused_qkv', [False, True])
@pytest.mark.parametrize('attn_impl', ['fast', 'reference'])
@pytest.mark.parametrize('hw', [(14, 14), (10, 23), (31, 6)])
def test_matches_spec_reference(fused_qkv, attn_impl, hw):
    module, reference = _pair(fused_qkv, attn_impl)
    x = torch.randn(2, hw[0] * hw[1], 32)
    with torch.no_grad():
        expected = reference(x, *hw)
        out = module(x, hw)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_single_head_matches_reference():
    module, reference = _pair(False, num_heads=1, agent_num=16)
    x = torch.randn(1, 12 * 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            module(x, (12, 9)), reference(x, 12, 9), atol=1e-4, rtol=0)


def test_fast_and_reference_paths_have_equal_gradients():
    fast, _ = _pair(False, 'fast')
    slow, _ = _pair(False, 'reference')
    x = torch.randn(2, 11 * 13, 32)
    grads = []
    for module in (fast, slow):
        module.train()
        x_in = x.clone().requires_grad_()
        (module(x_in, (11, 13))**2).sum().backward()
        grads.append((x_in.grad, {
            name: p.grad
            for name, p in module.named_parameters()
        }))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-4, rtol=0)
    assert grads[0][1].keys() == grads[1][1].keys()
    for name, grad in grads[0][1].items():
        assert grad is not None, name
        torch.testing.assert_close(
            grad, grads[1][1][name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize('attn_impl, stores_maps', [('fast', False),
                                                    ('reference', True)])
def test_only_the_reference_path_stores_attention_maps(attn_impl,
                                                       stores_maps):
    module, _ = _pair(False, attn_impl)
    module.train()
    hw, agents = (11, 13), 4 * 5
    map_dims = {(hw[0] * hw[1], agents), (agents, hw[0] * hw[1])}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(tuple(t.shape[-2:])) or t, lambda t: t):
        module(torch.randn(2, hw[0] * hw[1], 32, requires_grad=True), hw)
    assert any(dims in map_dims for dims in saved) == stores_maps


@pytest.mark.parametrize('batch_shape', [(), (3, ), (2, 4)])
def test_left_matmul_is_a_contiguous_matrix_product(batch_shape):
    matrix = torch.randn(6, 5)
    x = torch.randn(*batch_shape, 5, 7, requires_grad=True)
    out = left_matmul(matrix, x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, matrix @ x)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, matrix.t() @ grad)


@pytest.mark.parametrize('size_in, size_out', [((7, 7), (64, 48)),
                                               ((56, 56), (25, 42)),
                                               ((3, 3), (12, 12)),
                                               ((14, 9), (14, 9)),
                                               ((1, 5), (1, 11))])
def test_resize_by_matmul_is_bilinear_resizing(size_in, size_out):
    x = torch.randn(2, 5, *size_in)
    torch.testing.assert_close(
        resize_by_matmul(x, size_out),
        resize(x, size_out),
        atol=1e-5,
        rtol=1e-5)


# divisible, uneven and overlapping bins (more agents than tokens)
@pytest.mark.parametrize('hw, size', [((56, 56), (7, 7)), ((25, 42), (12, 12)),
                                      ((5, 3), (7, 7)), ((13, 1), (4, 2))])
def test_pool_tokens_is_adaptive_average_pooling(hw, size):
    # queries as a strided view of a fused projection, as in Agent-Swin
    qkv = torch.randn(2, hw[0] * hw[1], 3 * 6, dtype=torch.float64,
                      requires_grad=True)
    query = qkv[..., 6:12]
    grad = torch.randn(2, size[0] * size[1], 6, dtype=torch.float64)
    pooled = pool_tokens(query, hw, size)
    expected = map_to_tokens(
        torch.nn.functional.adaptive_avg_pool2d(tokens_to_map(query, hw),
                                                size))
    torch.testing.assert_close(pooled, expected)
    ours, = torch.autograd.grad(pooled, qkv, grad)
    want, = torch.autograd.grad(expected, qkv, grad)
    torch.testing.assert_close(ours, want)


@pytest.mark.parametrize('source_hw, hw, agent_shape', [
    ((7, 7), (64, 48), (12, 12)),
    ((56, 56), (25, 42), (28, 28)),
    ((14, 14), (14, 14), (2, 3)),
    ((7, 7), (3, 5), (7, 7)),
])
def test_mapped_source_is_the_literal_map_computed_in_another_order(
        source_hw, hw, agent_shape):
    source = torch.randn(3, 16, *source_hw)
    literal = to_agent_grid(resize(source, hw), agent_shape)
    agents = agent_shape[0] * agent_shape[1]
    agent_major = mapped_source(source, hw, agent_shape, token_major=False)
    token_major = mapped_source(source, hw, agent_shape, token_major=True)
    assert agent_major.shape == (3, agents, *hw)
    assert token_major.shape == (3, *hw, agents)
    torch.testing.assert_close(
        agent_major.flatten(2), literal.transpose(1, 2), atol=1e-4,
        rtol=1e-4)
    torch.testing.assert_close(
        token_major.flatten(1, 2), literal, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('token_major', [False, True])
@pytest.mark.parametrize('hw', [(64, 48), (5, 9), (56, 56)])
def test_separable_source_maps_term_by_term(hw, token_major):
    rows, cols = torch.randn(2, 9, 56, 1), torch.randn(2, 9, 1, 56)
    literal = to_agent_grid(resize(rows + cols, hw), (12, 12))
    row_map = mapped_source(rows, hw, (12, 12), token_major)
    col_map = mapped_source(cols, hw, (12, 12), token_major)
    grid_axes = slice(1, 3) if token_major else slice(2, 4)
    assert row_map.shape[grid_axes] == (hw[0], 1)
    assert col_map.shape[grid_axes] == (1, hw[1])
    summed = row_map + col_map
    summed = summed.flatten(1, 2) if token_major else summed.flatten(
        2).transpose(1, 2)
    torch.testing.assert_close(summed, literal, atol=1e-5, rtol=1e-5)


def test_bias_cache_is_used_in_eval_and_invalidated_on_update():
    module, reference = _pair(False)
    x = torch.randn(1, 8 * 8, 32)
    with torch.no_grad():
        first = module(x, (8, 8))
        assert len(module._bias_cache) == 1
        cached = next(iter(module._bias_cache.values()))
        module(x, (8, 8))
        assert next(iter(module._bias_cache.values()))[0] is cached[0]

        # an in-place update (as an optimizer step does) must miss the cache
        module.an_bias.add_(1.0)
        reference.an_bias.add_(1.0)
        updated = module(x, (8, 8))
    assert len(module._bias_cache) == 1
    assert not torch.allclose(first, updated)
    with torch.no_grad():
        torch.testing.assert_close(
            updated, reference(x, 8, 8), atol=1e-4, rtol=0)


def test_bias_cache_keeps_recent_input_shapes_only():
    module, reference = _pair(True)
    shapes = [(8, 8), (6, 10), (8, 8)]
    with torch.no_grad():
        for hw in shapes:
            module(torch.randn(1, hw[0] * hw[1], 32), hw)
    assert sorted(key[0] for key in module._bias_cache) == [(6, 10), (8, 8)]

    many = [(5 + i, 7) for i in range(BIAS_CACHE_SIZE + 2)]
    with torch.no_grad():
        for hw in many:
            x = torch.randn(1, hw[0] * hw[1], 32)
            torch.testing.assert_close(
                module(x, hw), reference(x, *hw), atol=1e-4, rtol=0)
    assert [key[0] for key in module._bias_cache] == many[-BIAS_CACHE_SIZE:]


@pytest.mark.parametrize('cache_size', [0, 1, 3])
def test_bias_cache_size_bounds_the_cached_shapes(cache_size):
    module, reference = _pair(True, bias_cache_size=cache_size)
    shapes = [(5 + i, 7) for i in range(4)]
    with torch.no_grad():
        for hw in shapes:
            x = torch.randn(1, hw[0] * hw[1], 32)
            torch.testing.assert_close(
                module(x, hw), reference(x, *hw), atol=1e-4, rtol=0)
    cached = [key[0] for key in module._bias_cache]
    assert cached == shapes[len(shapes) - cache_size:]


def test_bias_cache_is_not_used_when_training_or_with_grad():
    module, _ = _pair(False)
    x = torch.randn(1, 64, 32)
    module(x, (8, 8))  # eval, but gradients enabled
    assert not module._bias_cache
    with torch.no_grad():
        module(x, (8, 8))
    assert module._bias_cache
    module.train()
    assert not module._bias_cache
    with torch.no_grad():
        module(x, (8, 8))
    assert not module._bias_cache


def test_load_state_dict_invalidates_cache():
    module, _ = _pair(False)
    x = torch.randn(1, 49, 32)
    with torch.no_grad():
        before = module(x, (7, 7))
        state = module.state_dict()
        state['na_bias'] = state['na_bias'] + 0.5
        module.load_state_dict(state)
        after = module(x, (7, 7))
    assert not torch.allclose(before, after)


def test_biases_are_initialised_with_truncated_normal():
    module = AgentAttention(64, 4, ref_size=(28, 28), agent_num=49)
    for name in BIAS_NAMES:
        values = getattr(module, name).detach()
        assert values.abs().max() <= 2.0, name
        assert 0.01 < values.std() < 0.03, name


@pytest.mark.parametrize(
    'kwargs, message',
    [(dict(agent_num=10), 'square number'),
     (dict(attn_impl='flash'), "'fast', 'reference'"),
     (dict(num_heads=5), 'divisible'),
     (dict(bias_cache_size=-1), 'bias_cache_size'),
     (dict(bias_cache_size=1.5), 'bias_cache_size'),
     (dict(bias_cache_size=True), 'bias_cache_size')])
def test_bad_settings_are_rejected(kwargs, message):
    settings = dict(embed_dims=32, num_heads=2, ref_size=(7, 7))
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        AgentAttention(**settings)


def test_token_count_must_match_hw_shape():
    module = AgentAttention(32, 2, ref_size=(7, 7), agent_num=9)
    with pytest.raises(ValueError, match='hw_shape'):
        module(torch.randn(1, 50, 32), (7, 7))


def test_registered_in_root_registry():
    from mmengine.registry import MODELS
    module = MODELS.build(
        dict(type='AgentAttention', embed_dims=16, num_heads=2,
             ref_size=(7, 7), agent_num=4, agent_shape=(3, 3)))
    assert isinstance(module, AgentAttention)
    out = module(torch.randn(2, 35, 16), (5, 7))
    assert out.shape == (2, 35, 16)
