"""AgentAttention: fidelity to the spec, fast vs reference path, bias cache."""
import contextlib
import copy
import random

import pytest
import torch
from mmengine.model import ExponentialMovingAverage
from mmengine.model.weight_init import trunc_normal_
from reference_agent import ReferenceAgentAttention, randomize_

from agent_mm.models import AgentAttention
from agent_mm.models import agent_attention as agent_attention_module
from agent_mm.models.agent_attention import BIAS_CACHE_SIZE, BIAS_NAMES
from agent_mm.models.bias_cache import ADMIT_AFTER
from agent_mm.models.bias_maps import interpolation_matrix, pooling_matrix
from agent_mm.ops.blocked_attention import blocks_only


def _pair(fused_qkv,
          attn_impl='fast',
          bias_cache_size=BIAS_CACHE_SIZE,
          bias_cache_admit_after=ADMIT_AFTER,
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
        pretrain_grid=settings['ref_size'],
        agent_num=settings['agent_num'],
        agent_shape=settings['agent_shape'],
        fused_qkv=fused_qkv,
        attn_impl=attn_impl,
        bias_cache_size=bias_cache_size,
        bias_cache_admit_after=bias_cache_admit_after)
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


def _random_settings(rng: random.Random) -> tuple:
    """Settings of a random agent attention, token grid and batch: 1-4
    heads of 8-32 channels, 2²-7² bias agents, agent grids square or not,
    token grids from 1×1 up to 40×40."""
    heads = rng.choice([1, 2, 3, 4])
    side = rng.choice([2, 3, 4, 5, 7])
    agent_shape = rng.choice([(side, side),
                              (rng.randint(2, 9), rng.randint(2, 9))])
    settings = dict(
        dim=heads * rng.choice([8, 16, 24, 32]),
        num_heads=heads,
        agent_num=side * side,
        agent_shape=agent_shape,
        ref_size=(rng.randint(3, 20), rng.randint(3, 20)),
        fused_qkv=rng.random() < 0.5)
    hw = (rng.randint(1, 40), rng.randint(1, 40))
    return settings, hw, rng.choice([1, 2, 3])


def _call(module, x, hw):
    """``module`` on ``x`` laid out as ``hw``: ours takes the grid as a
    tuple, the spec reference as two arguments."""
    if isinstance(module, AgentAttention):
        return module(x, hw)
    return module(x, *hw)


def _run(module, x, hw, dtype, training, context):
    """The output and the gradients (of ``x`` and every parameter, by
    name) of one call, under autocast to ``dtype`` (None: float32)."""
    module.train(training)
    module.zero_grad()
    x = x.clone().requires_grad_(training)
    autocast = (torch.autocast('cpu', dtype)
                if dtype else contextlib.nullcontext())
    with autocast, context:
        if not training:
            with torch.no_grad():
                # the third call reads the maps the bias cache admitted
                outs = [_call(module, x, hw) for _ in range(3)]
            return outs[-1], {}
        out = _call(module, x, hw)
        (out.float()**2).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return out, dict(grads, x=x.grad)


def _errors(result, truth) -> tuple:
    """Error of an output and largest error of the gradients, each relative
    to the true one's norm (gradients: at least a thousandth of the largest
    true gradient's, as a bias whose softmax cancels it has none)."""
    out, grads = result
    true_out, true_grads = truth
    out_error = ((out.float() - true_out).norm() / true_out.norm()).item()
    largest = max((g.norm().item() for g in true_grads.values()), default=0)
    grad_error = 0.
    for name, true in true_grads.items():
        scale = max(true.norm().item(), 1e-3 * largest)
        grad_error = max(grad_error,
                         ((grads[name].float() - true).norm() / scale).item())
    return out_error, grad_error


@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('dtype', [None, torch.bfloat16, torch.float16])
def test_fast_path_matches_the_spec_over_random_settings(dtype, training):
    """Over random heads, agent grids and token grids (1-wide ones
    included), the fast path gives the spec reference's output and
    gradients: in float32 to float32's rounding, under autocast no further
    from the float32 truth than the reference under the same autocast
    (inference: by the kernel the model chooses and by the blocks)."""
    rng = random.Random(f'{dtype}-{training}')
    for case in range(8):
        settings, hw, batch = _random_settings(rng)
        module, reference = _pair(**settings)
        x = torch.randn(batch, hw[0] * hw[1], settings['dim'],
                        generator=torch.Generator().manual_seed(case))
        truth = _run(reference, x, hw, None, training,
                     contextlib.nullcontext())
        truth = (truth[0].float(), {n: g.float() for n, g in truth[1].items()})
        context = (blocks_only() if not training and case % 2 else
                   contextlib.nullcontext())
        fast = _errors(_run(module, x, hw, dtype, training, context), truth)
        if dtype is None:
            bound = (1e-5, 1e-4)
        else:
            spec = _errors(
                _run(reference, x, hw, dtype, training,
                     contextlib.nullcontext()), truth)
            bound = (max(2 * spec[0], 1e-2), max(2 * spec[1], 1e-1))
        assert fast[0] <= bound[0], (settings, hw, batch, fast, bound)
        assert fast[1] <= bound[1], (settings, hw, batch, fast, bound)


@pytest.mark.parametrize('attn_impl, stores_maps', [('fast', False),
                                                    ('reference', True)])
def test_only_the_reference_path_stores_attention_maps(attn_impl, stores_maps):
    module, _ = _pair(False, attn_impl)
    module.train()
    hw, agents = (11, 13), 4 * 5
    # per image: a (heads, L, S) bias shared by the batch is not a map
    batch, heads = 2, module.num_heads
    map_shapes = {(batch, heads, hw[0] * hw[1], agents),
                  (batch, heads, agents, hw[0] * hw[1])}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        module(torch.randn(batch, hw[0] * hw[1], 32, requires_grad=True), hw)
    assert any(shape in map_shapes for shape in saved) == stores_maps


def test_bias_cache_is_used_in_eval_and_invalidated_on_update():
    module, reference = _pair(False, bias_cache_admit_after=1)
    x = torch.randn(1, 8 * 8, 32)
    with torch.no_grad():
        first = module(x, (8, 8))
        assert module.bias_cache.shapes == [(8, 8)]
        cached = module.bias_cache.maps((8, 8))
        assert module.bias_cache.nbytes == sum(t.numel() * t.element_size()
                                               for t in cached) > 0
        module(x, (8, 8))
        assert module.bias_cache.maps((8, 8))[0] is cached[0]

        # an in-place update (as an optimizer step does) must miss the cache
        module.an_bias.add_(1.0)
        reference.an_bias.add_(1.0)
        updated = module(x, (8, 8))
    assert len(module.bias_cache) == 1
    assert module.bias_cache.maps((8, 8))[0] is not cached[0]
    assert not torch.allclose(first, updated)
    with torch.no_grad():
        torch.testing.assert_close(
            updated, reference(x, 8, 8), atol=1e-4, rtol=0)


def test_bias_cache_keeps_recent_input_shapes_only():
    module, reference = _pair(True, bias_cache_admit_after=1)
    shapes = [(8, 8), (6, 10), (8, 8)]
    with torch.no_grad():
        for hw in shapes:
            module(torch.randn(1, hw[0] * hw[1], 32), hw)
    assert module.bias_cache.shapes == [(6, 10), (8, 8)]

    many = [(5 + i, 7) for i in range(BIAS_CACHE_SIZE + 2)]
    with torch.no_grad():
        for hw in many:
            x = torch.randn(1, hw[0] * hw[1], 32)
            torch.testing.assert_close(
                module(x, hw), reference(x, *hw), atol=1e-4, rtol=0)
    assert module.bias_cache.shapes == many[-BIAS_CACHE_SIZE:]


@pytest.mark.parametrize('cache_size', [0, 1, 3])
def test_bias_cache_size_bounds_the_cached_shapes(cache_size):
    module, reference = _pair(
        True, bias_cache_size=cache_size, bias_cache_admit_after=1)
    shapes = [(5 + i, 7) for i in range(4)]
    with torch.no_grad():
        for hw in shapes:
            x = torch.randn(1, hw[0] * hw[1], 32)
            torch.testing.assert_close(
                module(x, hw), reference(x, *hw), atol=1e-4, rtol=0)
    cached = module.bias_cache.shapes
    assert cached == shapes[len(shapes) - cache_size:]


def test_bias_cache_is_not_used_when_training_or_with_grad():
    module, _ = _pair(False, bias_cache_admit_after=1)
    x = torch.randn(1, 64, 32)
    module(x, (8, 8))  # eval, but gradients enabled
    assert not module.bias_cache
    with torch.no_grad():
        module(x, (8, 8))
    assert module.bias_cache
    module.train()
    assert not module.bias_cache
    with torch.no_grad():
        module(x, (8, 8))
    assert not module.bias_cache


def test_load_state_dict_invalidates_cache():
    module, _ = _pair(False, bias_cache_admit_after=1)
    x = torch.randn(1, 49, 32)
    with torch.no_grad():
        before = module(x, (7, 7))
        state = module.state_dict()
        state['na_bias'] = state['na_bias'] + 0.5
        module.load_state_dict(state)
        after = module(x, (7, 7))
    assert not torch.allclose(before, after)


@pytest.mark.parametrize('name', BIAS_NAMES)
def test_writes_through_data_invalidate_the_cache(name):
    module, _ = _pair(False, bias_cache_admit_after=1)
    x = torch.randn(1, 7 * 9, 32)
    with torch.no_grad():
        module(x, (7, 9))
        getattr(module, name).data.mul_(-2.)  # leaves _version as it was
        updated = module(x, (7, 9))
        # a copy starts with an empty cache
        expected = copy.deepcopy(module)(x, (7, 9))
    torch.testing.assert_close(updated, expected, atol=0, rtol=0)


def test_an_ema_model_in_eval_follows_its_averaged_weights():
    module, _ = _pair(False, bias_cache_admit_after=1)
    ema = ExponentialMovingAverage(module, momentum=0.5).eval()
    x = torch.randn(1, 8 * 8, 32)
    with torch.no_grad():
        ema(x, (8, 8))
        for param in module.parameters():
            param.add_(0.1)  # a step of the trained model
        ema.update_parameters(module)
        expected = copy.deepcopy(ema.module)(x, (8, 8))
        torch.testing.assert_close(ema(x, (8, 8)), expected, atol=0, rtol=0)


def test_bias_cache_admits_a_shape_at_its_second_forward():
    module, _ = _pair(False)
    uncached, _ = _pair(False, bias_cache_size=0)
    x = torch.randn(2, 9 * 7, 32)
    with torch.no_grad():
        expected = uncached(x, (9, 7))
        first = module(x, (9, 7))
        assert module.bias_cache.nbytes == 0
        assert module.bias_cache.maps((9, 7)) is None
        second = module(x, (9, 7))
        assert module.bias_cache.shapes == [(9, 7)]
        assert module.bias_cache.nbytes > 0
        cached = module.bias_cache.maps((9, 7))
        third = module(x, (9, 7))
        assert module.bias_cache.maps((9, 7))[0] is cached[0]
    for out in (first, second, third):
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_biases_are_initialised_with_truncated_normal(monkeypatch):
    calls = []  # (tensor, std) of each trunc_normal_ call

    def spy(tensor, std=1., **kwargs):
        calls.append((tensor, std))
        return trunc_normal_(tensor, std=std, **kwargs)

    monkeypatch.setattr(agent_attention_module, 'trunc_normal_', spy)
    module = AgentAttention(64, 4, pretrain_grid=(28, 28), agent_num=49)
    initialised = {id(tensor): std for tensor, std in calls}
    for name in BIAS_NAMES:
        values = getattr(module, name).detach()
        assert initialised[id(getattr(module, name))] == .02, name
        assert 0.01 < values.std() < 0.03, name


@pytest.mark.parametrize('kwargs, message',
                         [(dict(agent_num=10), 'square number'),
                          (dict(attn_impl='flash'), "'fast', 'reference'"),
                          (dict(num_heads=5), 'divisible'),
                          (dict(bias_cache_size=-1), 'bias_cache_size'),
                          (dict(bias_cache_size=1.5), 'bias_cache_size'),
                          (dict(bias_cache_size=True), 'bias_cache_size'),
                          (dict(bias_cache_admit_after=0),
                           'bias_cache_admit_after')])
def test_bad_settings_are_rejected(kwargs, message):
    settings = dict(embed_dims=32, num_heads=2, pretrain_grid=(7, 7))
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        AgentAttention(**settings)


def test_token_count_must_match_hw_shape():
    module = AgentAttention(32, 2, pretrain_grid=(7, 7), agent_num=9)
    with pytest.raises(ValueError, match='hw_shape'):
        module(torch.randn(1, 50, 32), (7, 7))


def test_registered_in_root_registry():
    from mmengine.registry import MODELS
    module = MODELS.build(
        dict(
            type='AgentAttention',
            embed_dims=16,
            num_heads=2,
            pretrain_grid=(7, 7),
            agent_num=4,
            agent_shape=(3, 3)))
    assert isinstance(module, AgentAttention)
    out = module(torch.randn(2, 35, 16), (5, 7))
    assert out.shape == (2, 35, 16)


def test_a_float32_forward_never_reads_maps_cached_under_bfloat16():
    module, _ = _pair(False, bias_cache_admit_after=1)
    uncached, _ = _pair(False, bias_cache_size=0)
    x = torch.randn(1, 8 * 8, 32)
    with torch.no_grad():
        with torch.autocast('cpu', torch.bfloat16):
            module(x, (8, 8))
        assert module.bias_cache.maps((8, 8))[0].dtype == torch.bfloat16
        out = module(x, (8, 8))
        expected = uncached(x, (8, 8))
    assert module.bias_cache.maps((8, 8))[0].dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_maps_cached_in_float32_are_rebuilt_in_bfloat16_under_autocast():
    module, _ = _pair(False, bias_cache_admit_after=1)
    x = torch.randn(1, 8 * 8, 32)
    with torch.no_grad():
        module(x, (8, 8))
        with torch.autocast('cpu', torch.bfloat16):
            module(x, (8, 8))
            bf16_maps = module.bias_cache.maps((8, 8))
            module(x, (8, 8))
    assert [t.dtype for t in bf16_maps] == [torch.bfloat16] * 2
    assert module.bias_cache.maps((8, 8))[0] is bf16_maps[0]
    assert len(module.bias_cache) == 1


def test_threads_can_share_a_module_for_inference(run_in_threads):
    module, _ = _pair(False, bias_cache_admit_after=1)
    uncached, _ = _pair(False, bias_cache_size=0)
    shapes = [(4 + i, 5) for i in range(6)]
    inputs = {hw: torch.randn(1, hw[0] * hw[1], 32) for hw in shapes}
    with torch.no_grad():
        expected = {hw: uncached(x, hw) for hw, x in inputs.items()}

    def work(seed):
        for step in range(100):
            hw = shapes[(seed * 7 + step * 5) % len(shapes)]
            with torch.no_grad():
                out = module(inputs[hw], hw)
            torch.testing.assert_close(out, expected[hw], atol=1e-5, rtol=0)

    assert run_in_threads(work, 8) == []


def _input_grad(module, x, hw):
    x = x.clone().requires_grad_()
    module(x, hw).square().sum().backward()
    return x.grad


def test_training_after_an_inference_mode_forward():
    for matrix in (interpolation_matrix, pooling_matrix):
        matrix.cache_clear()  # the weights are first made in inference mode
    module, _ = _pair(False)
    fresh, _ = _pair(False)
    x = torch.randn(2, 8 * 8, 32)
    with torch.inference_mode():
        module(x, (8, 8))
    module.train()
    fresh.train()
    torch.testing.assert_close(
        _input_grad(module, x, (8, 8)), _input_grad(fresh, x, (8, 8)))


def test_maps_cached_in_inference_mode_serve_a_frozen_module_with_autograd():
    module, _ = _pair(False, bias_cache_admit_after=1)
    uncached, _ = _pair(False, bias_cache_size=0)
    for frozen in (module, uncached):
        frozen.requires_grad_(False)
    x = torch.randn(1, 8 * 8, 32)
    with torch.inference_mode():
        module(x, (8, 8))
    assert module.bias_cache.shapes == [(8, 8)]
    torch.testing.assert_close(
        _input_grad(module, x, (8, 8)), _input_grad(uncached, x, (8, 8)))


@pytest.mark.parametrize('cache_size', [0, BIAS_CACHE_SIZE])
def test_inference_maps_are_built_by_rows_and_training_maps_by_products(
        cache_size, maps_by_rows):
    module, reference = _pair(
        False, bias_cache_size=cache_size, bias_cache_admit_after=1)
    x = torch.randn(2, 8 * 8, 32)
    with torch.no_grad():
        out = module(x, (8, 8))
    # the token-major map of the forward (cached or not)
    assert len(maps_by_rows) == 1
    torch.testing.assert_close(out, reference(x, 8, 8))
    module.train()
    module(x, (8, 8)).sum().backward()  # maps built in forward and backward
    module.eval()
    module(x, (8, 8))  # eval with autograd on the trained biases
    assert len(maps_by_rows) == 1


def test_bfloat16_inference_by_blocks_is_as_close_to_float32_as_fused(
        monkeypatch):
    from agent_mm.models import agent_attention
    module, _ = _pair(False)
    x = torch.randn(2, 8 * 8, 32)
    blocked = []

    def spy(*args):
        blocked.append(args)
        return attend_by_blocks(*args)

    attend_by_blocks = agent_attention.blocked_attention
    monkeypatch.setattr(agent_attention, 'blocked_attention', spy)
    outs = {}
    for prefer in (True, False):
        monkeypatch.setattr(agent_attention, 'prefers_blocks',
                            lambda *args, prefer=prefer, **kwargs: prefer)
        with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
            outs[prefer] = module(x, (8, 8)).float()
    with torch.no_grad():
        expected = module(x, (8, 8))
    assert len(blocked) == 2  # the agents' attention, then the tokens'
    for out in outs.values():
        torch.testing.assert_close(out, expected, atol=0.02, rtol=0.02)


def _bias_grads_per_forward(module, x, hw, forwards):
    """The gradients of the trainable biases at each of ``forwards``
    forwards of the same shape (eval mode, autograd on)."""
    grads = []
    for _ in range(forwards):
        module.zero_grad()
        module(x, hw).square().sum().backward()
        grads.append({
            name: getattr(module, name).grad
            for name in BIAS_NAMES if getattr(module, name).requires_grad
        })
    return grads


def test_partly_frozen_biases_get_their_gradients_at_every_forward():
    # only the biases train (the input and projections do not), one frozen
    partly, _ = _pair(False)
    whole, _ = _pair(False)
    for module in (partly, whole):
        module.requires_grad_(False)
        for name in BIAS_NAMES:
            getattr(module, name).requires_grad_(name != 'an_bias'
                                                 or module is whole)
    x = torch.randn(2, 8 * 8, 32)
    expected = _bias_grads_per_forward(whole, x, (8, 8), 3)
    for got, want in zip(_bias_grads_per_forward(partly, x, (8, 8), 3),
                         expected):
        assert sorted(got) == sorted(set(BIAS_NAMES) - {'an_bias'})
        for name, grad in got.items():
            torch.testing.assert_close(grad, want[name])
