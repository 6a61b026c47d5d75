"""Checks, tiny backbones and checkpoint layouts shared by the AgentPVT,
AgentSwinTransformer, settings and checkpoint tests."""
import re
import warnings

import torch
import torch.nn as nn

from agent_mm.models import AgentAttention, AgentPVT, AgentSwinTransformer

TINY_SETTINGS = {
    'pvt': (AgentPVT,
            dict(
                depths=[1, 1, 1, 1],
                embed_dims=[8, 16, 16, 32],
                num_heads=[1, 2, 2, 4],
                attn_type='AABA')),
    'swin': (AgentSwinTransformer,
             dict(
                 embed_dims=8,
                 depths=[1, 1, 2, 1],
                 num_heads=[1, 2, 2, 4],
                 attn_type='AAMB1')),
}


def tiny(name, **kwargs):
    """A tiny backbone (agent and plain attention stages) with ``kwargs``
    overriding its settings."""
    backbone, settings = TINY_SETTINGS[name]
    return backbone(**{**settings, **kwargs})


def error_message(argument, value):
    """What every error says: the argument, what it must be, the value and
    a fix (the sentence after the value)."""
    return rf'{re.escape(argument)} must be .+, got {re.escape(repr(value))}'\
        r'\. \S'


def assert_parity(module: nn.Module, reference: nn.Module, img: torch.Tensor):
    """``module`` loaded with ``reference``'s weights gives its features."""
    module.load_state_dict(reference.state_dict(), strict=True)
    module.eval()
    reference.eval()
    with torch.no_grad():
        outs = module(img)
        expected = reference(img)
    assert len(outs) == len(expected)
    for out, ref in zip(outs, expected):
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def assert_every_parameter_gets_gradient(module: nn.Module,
                                         img: torch.Tensor):
    module.train()
    sum(out.square().mean() for out in module(img)).backward()
    for name, param in module.named_parameters():
        assert param.grad is not None, f'{name} got no gradient'
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f'{name} has a zero gradient'


def _trained_twice(build, img: torch.Tensor, option: str):
    """Outputs, input gradient and parameter gradients of one training
    forward and backward (of the outputs' sum of squares) of
    ``build(option=False)`` and of ``build(option=True)``, built alike."""
    results = []
    for value in (False, True):
        torch.manual_seed(0)
        module = build(**{option: value})
        module.init_weights()
        module.train()
        x = img.clone().requires_grad_()
        outs = module(x)
        sum(out.square().sum() for out in outs).backward()
        results.append((outs, x.grad,
                        {n: p.grad for n, p in module.named_parameters()}))
    return results


def _assert_same_gradients(results):
    (_, grad_a, params_a), (_, grad_b, params_b) = results
    torch.testing.assert_close(grad_a, grad_b)
    for name, grad in params_a.items():
        torch.testing.assert_close(grad, params_b[name], msg=name)


def assert_checkpointing_is_transparent(build, img: torch.Tensor):
    """``with_cp=True`` gives the same outputs and gradients."""
    results = _trained_twice(build, img, 'with_cp')
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b)
    _assert_same_gradients(results)


def assert_channels_last_outputs_are_the_same_maps(build, img: torch.Tensor):
    """``channels_last_outputs=True`` gives the same maps in channels-last
    memory (the default: contiguous NCHW), and the same gradients."""
    results = _trained_twice(build, img, 'channels_last_outputs')
    for nchw, channels_last in zip(results[0][0], results[1][0]):
        assert nchw.is_contiguous() and not channels_last.is_contiguous()
        assert channels_last.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(nchw, channels_last, rtol=0, atol=0)
    _assert_same_gradients(results)


def assert_bias_cache_settings_reach_every_attention(
        build, img: torch.Tensor):
    """``build(bias_cache_size=n, bias_cache_admit_after=k)`` gives every
    agent attention a cache of ``n`` shapes admitted at their ``k``-th
    forward: one eval forward caches its shape only with ``n > 0`` and
    ``k == 1``, and the features are the same."""
    features = {}
    for size, admit_after in ((0, 1), (1, 1), (1, 2)):
        torch.manual_seed(0)
        module = build(
            bias_cache_size=size, bias_cache_admit_after=admit_after).eval()
        attns = [m for m in module.modules() if isinstance(m, AgentAttention)]
        assert attns
        with torch.no_grad():
            features[size, admit_after] = module(img)
        assert all(m.bias_cache_size == size for m in attns)
        assert all(m.bias_cache_admit_after == admit_after for m in attns)
        cached = size if admit_after == 1 else 0
        assert all(len(m.bias_cache) == cached for m in attns)
    for settings in ((1, 1), (1, 2)):
        for cached, uncached in zip(features[settings], features[0, 1]):
            torch.testing.assert_close(cached, uncached)
    assert_bias_caches_share_the_backbones_budget(build, img,
                                                  features[0, 1])


def assert_bias_caches_share_the_backbones_budget(build, img: torch.Tensor,
                                                  expected) -> None:
    """``build(bias_cache_max_mb=m)`` gives all agent attentions one budget
    of ``m`` MiB: with room for part of the maps, the first attentions'
    are cached, the others' not, and the features are unchanged."""
    sizes = []
    for max_mb in (None, 0.):
        module = build(bias_cache_max_mb=max_mb,
                       bias_cache_admit_after=1).eval()
        attns = [m for m in module.modules() if isinstance(m, AgentAttention)]
        with torch.no_grad():
            module(img)
        assert len({id(m.bias_cache.budget) for m in attns}) == 1
        sizes.append([m.bias_cache.nbytes for m in attns])
    unbounded, nothing = sizes
    assert all(unbounded) and not any(nothing)
    half = sum(unbounded) // 2
    torch.manual_seed(0)
    module = build(bias_cache_max_mb=half / 2**20,
                   bias_cache_admit_after=1).eval()
    attns = [m for m in module.modules() if isinstance(m, AgentAttention)]
    with torch.no_grad():
        features = module(img)
    held = [m.bias_cache.nbytes for m in attns]
    assert 0 < sum(held) <= half
    assert held[0] == unbounded[0] and held[-1] == 0
    assert attns[0].bias_cache.budget.held == sum(held)
    for out, ref in zip(features, expected):
        torch.testing.assert_close(out, ref)


def assert_frozen(module: nn.Module, frozen_prefixes, trainable_prefixes):
    """Frozen parts have no grad from construction on (as a
    ``DistributedDataParallel`` wrapper built before ``train()`` must see
    them) and after ``train()``, and stay in eval mode."""
    for _ in range(2):  # as built, then after train()
        for name, param in module.named_parameters():
            if name.startswith(tuple(frozen_prefixes)):
                assert not param.requires_grad, name
            elif name.startswith(tuple(trainable_prefixes)):
                assert param.requires_grad, name
        module.train()
    for name, sub in module.named_modules():
        if name and name.startswith(tuple(frozen_prefixes)):
            assert not sub.training, name
        elif name.startswith(tuple(trainable_prefixes)):
            assert sub.training, name


def assert_inference_calls_what_the_modules_are(module: nn.Module,
                                                img: torch.Tensor):
    """Inference (autograd off) computes what calling the layers gives:
    forward hooks on every ``nn.Linear`` see each call they would see with
    autograd on, and a dynamically quantized copy gives the features it
    gives with autograd on."""
    module.eval()
    linears = [m for m in module.modules() if type(m) is nn.Linear]
    calls = {}
    for layer in linears:
        layer.register_forward_hook(lambda layer, inputs, output: calls.
                                    setdefault(layer, []).append(output.shape))
    with torch.no_grad():
        module(img)
    without_grad, calls = calls, {}
    module(img)
    assert without_grad == calls and len(calls) == len(linears)
    quantized = quantized_dynamically(module)
    expected = quantized(img)
    with torch.no_grad():
        features = quantized(img)
    for out, ref in zip(features, expected):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def quantized_dynamically(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose ``nn.Linear`` layers are dynamically
    quantized (``torch.ao.quantization``, deprecated in favour of torchao:
    its warnings are silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return torch.ao.quantization.quantize_dynamic(module, {nn.Linear})


def random_weights(model: nn.Module, seed: int = 1,
                   std: float = 1.0) -> nn.Module:
    """``model`` with every parameter drawn from N(0, std²), seeded."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=std)
    return model


def downstream_layout(state_dict):
    """``state_dict`` as the backbone of a detector checkpoint of mmdet."""
    weights = {f'backbone.{k}': v for k, v in state_dict.items()}
    weights['neck.lateral_convs.0.conv.weight'] = torch.zeros(256, 64, 1, 1)
    weights['rpn_head.rpn_conv.weight'] = torch.zeros(256, 256, 3, 3)
    return {'state_dict': weights,
            'meta': {'mmdet_version': '2.25.0', 'epoch': 12}}
