"""Tests of the shared backbone layers (agent_mm/models/layers.py)."""
import pytest
import torch
import torch.nn as nn
from backbone_checks import quantized_dynamically

from agent_mm.models import layers
from agent_mm.models.fused_linear import (FLOAT32_MAX_WIDTH, NO_ACTIVATION,
                                          activation_epilogue, fused_linear,
                                          fuses_epilogues)
from agent_mm.models.layers import (ChannelsLastConv2d, DropPath, Mlp,
                                    activate_, biased_attention, linear_into,
                                    map_to_tokens, mlp_residual, residual_sum,
                                    round_up, tokens_to_map, tokens_to_nchw)


def _branch(training: bool = False, dims: int = 8, hidden: int = 32):
    """Norm, MLP and drop path of a block in train or eval mode."""
    torch.manual_seed(0)
    modules = nn.LayerNorm(dims), Mlp(dims, hidden), DropPath(0.5)
    return tuple(module.train(training) for module in modules)


def _expected(x, norm, mlp):
    return x + mlp(norm(x))


@pytest.mark.parametrize('chunk_tokens', [1, 5, 64, 10_000])
def test_inference_residual_matches_the_plain_sum(monkeypatch, chunk_tokens):
    norm, mlp, drop_path = _branch()
    # chunks of `chunk_tokens` tokens: 32 hidden floats of 4 bytes each
    monkeypatch.setattr(layers, 'MLP_CHUNK_BYTES', chunk_tokens * 32 * 4)
    x = torch.randn(3, 37, 8)
    expected = _expected(x, norm, mlp)
    with torch.no_grad():
        out = mlp_residual(x.clone(), norm, mlp, drop_path, training=False)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('act_cfg, dtype', [
    (None, torch.float32),
    (dict(type='GELU', approximate='tanh'), torch.float32),
    (dict(type='ReLU'), torch.float32),
    (dict(type='SiLU'), torch.float32),
    (dict(type='SiLU'), torch.bfloat16),  # no oneDNN epilogue: buffered
])
def test_inference_residual_computes_as_the_plain_sum_under_autocast(
        monkeypatch, act_cfg, dtype):
    torch.manual_seed(0)
    norm, mlp = nn.LayerNorm(8), Mlp(8, 32, act_cfg=act_cfg).eval()
    monkeypatch.setattr(layers, 'MLP_CHUNK_BYTES', 5 * 32 * dtype.itemsize)
    x = torch.randn(2, 13, 8)
    with torch.no_grad(), torch.autocast(
            'cpu', torch.bfloat16, enabled=dtype == torch.bfloat16):
        expected = _expected(x, norm, mlp)
        out = mlp_residual(x.clone(), norm, mlp, nn.Identity(), False)
    # the products in the autocast dtype (bfloat16 products are ~1e-3 off
    # float32 ones), the residual in float32
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def _epilogue_mlp(x, norm, mlp):
    """The bfloat16 MLP branch with bias and activation applied to the
    float32 sums of the first product, rounded once after them."""
    def product(h, layer):
        weight, bias = (t.bfloat16().float() for t in (layer.weight,
                                                       layer.bias))
        return h.bfloat16().float() @ weight.t() + bias

    hidden = mlp.act(product(norm(x), mlp.fc1)).bfloat16()
    return product(hidden, mlp.fc2).bfloat16()


@pytest.mark.parametrize('act_cfg', [
    None,
    dict(type='GELU', approximate='tanh'),
    dict(type='ReLU'),
])
def test_bfloat16_inference_residual_fuses_bias_and_activation(
        monkeypatch, act_cfg):
    torch.manual_seed(0)
    norm, mlp = nn.LayerNorm(8), Mlp(8, 32, act_cfg=act_cfg).eval()
    monkeypatch.setattr(layers, 'MLP_CHUNK_BYTES', 5 * 32 * 2)
    x = torch.randn(2, 13, 8)
    with torch.no_grad():
        fused = x + _epilogue_mlp(x, norm, mlp)
        with torch.autocast('cpu', torch.bfloat16):
            plain = _expected(x, norm, mlp)
            out = mlp_residual(x.clone(), norm, mlp, nn.Identity(), False)
    if fuses_epilogues(torch.bfloat16, x.device, 8):
        # one bfloat16 rounding of the branch apart at most
        torch.testing.assert_close(out, fused, atol=2e-2, rtol=1e-2)
    else:
        torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('act_cfg, dtype, dims, fusable', [
    (None, torch.bfloat16, 8, True),
    (dict(type='ReLU'), torch.bfloat16, 8, True),
    (dict(type='SiLU'), torch.bfloat16, 8, False),
    (None, torch.float32, 8, True),
    (None, torch.float32, FLOAT32_MAX_WIDTH + 1, False),
])
def test_inference_residual_takes_the_fused_products_where_the_rule_says(
        monkeypatch, act_cfg, dtype, dims, fusable):
    calls = []

    def counted(x, weight, bias, epilogue=NO_ACTIVATION):
        calls.append(epilogue)
        return fused_linear(x, weight, bias, epilogue)

    monkeypatch.setattr(layers, 'fused_linear', counted)
    monkeypatch.setattr(layers, 'MLP_CHUNK_BYTES', 5 * 32 * dtype.itemsize)
    norm, mlp = nn.LayerNorm(dims), Mlp(dims, 32, act_cfg=act_cfg).eval()
    x = torch.randn(2, 13, dims)  # 26 tokens: 6 chunks of at most 5
    with torch.no_grad(), torch.autocast(
            'cpu', torch.bfloat16, enabled=dtype == torch.bfloat16):
        mlp_residual(x, norm, mlp, nn.Identity(), False)
    if fusable and fuses_epilogues(dtype, x.device, dims):
        first = activation_epilogue(mlp.act)
        assert calls == [first, NO_ACTIVATION] * 6
    else:
        assert calls == []


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_linear_into_writes_the_layer_output_in_the_dtype_of_out(
        bias, dtype):
    linear = nn.Linear(6, 5, bias=bias)
    x = torch.randn(7, 6)
    out = torch.empty(7, 5, dtype=dtype)
    with torch.autocast('cpu', torch.bfloat16, enabled=dtype != x.dtype):
        expected = linear(x)
    with torch.no_grad():
        assert linear_into(out, x, linear.weight, linear.bias) is out
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


# the MLP paths this build can take: with oneDNN's fused products (where
# PyTorch has them, as its x86 builds do) and without
MLP_PATHS = ([True, False]
             if fuses_epilogues(torch.float32, torch.device('cpu'), 8) else
             [False])


@pytest.mark.parametrize('fused', MLP_PATHS)
def test_inference_residual_of_linear_layers_without_bias(monkeypatch, fused):
    monkeypatch.setattr(layers, 'fuses_epilogues', lambda *args: fused)
    norm, mlp, drop_path = _branch()
    mlp.fc1 = nn.Linear(8, 32, bias=False)
    mlp.fc2 = nn.Linear(32, 8, bias=False)
    x = torch.randn(2, 10, 8)
    expected = _expected(x, norm, mlp)
    with torch.no_grad():
        out = mlp_residual(x, norm, mlp, drop_path, training=False)
    assert out.data_ptr() == x.data_ptr()  # the chunked path
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize('act', [
    nn.GELU(), nn.GELU(approximate='tanh'),
    nn.ReLU(), nn.SiLU()
])
def test_activate_writes_the_activation_into_its_input(act):
    x = torch.randn(4, 6)
    expected = act(x)
    out = activate_(act, x)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, expected, atol=0, rtol=0)


def test_inference_residual_accumulates_in_place():
    norm, mlp, drop_path = _branch()
    x = torch.randn(2, 10, 8)
    with torch.no_grad():
        out = mlp_residual(x, norm, mlp, drop_path, training=False)
    assert out.data_ptr() == x.data_ptr()


def test_inference_residual_of_a_strided_input_leaves_it_untouched():
    norm, mlp, drop_path = _branch()
    base = torch.randn(10, 2, 8)
    x = base.transpose(0, 1)  # not contiguous: worked on as a copy
    before = base.clone()
    with torch.no_grad():
        out = mlp_residual(x, norm, mlp, drop_path, training=False)
    torch.testing.assert_close(out, _expected(before.transpose(0, 1), norm,
                                              mlp))
    torch.testing.assert_close(base, before)


@pytest.mark.parametrize('hooked', ['norm', 'fc1', 'act', 'fc2', 'mlp'])
def test_inference_residual_calls_hooked_modules_on_all_tokens(hooked):
    norm, mlp, drop_path = _branch()
    modules = dict(norm=norm, fc1=mlp.fc1, act=mlp.act, fc2=mlp.fc2, mlp=mlp)
    seen = []
    modules[hooked].register_forward_hook(
        lambda module, inputs, output: seen.append(output.shape))
    x = torch.randn(3, 37, 8)
    with torch.no_grad():
        out = mlp_residual(x.clone(), norm, mlp, drop_path, training=False)
    assert seen == [(3, 37, 8 if hooked in ('norm', 'fc2', 'mlp') else 32)]
    torch.testing.assert_close(out, _expected(x, norm, mlp))


def test_inference_residual_calls_the_mlp_under_a_global_hook():
    norm, mlp, drop_path = _branch()
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: seen.append(module))
    try:
        with torch.no_grad():
            mlp_residual(torch.randn(2, 5, 8), norm, mlp, drop_path, False)
    finally:
        handle.remove()
    assert mlp.fc1 in seen and mlp.fc2 in seen


def test_inference_residual_of_a_dynamically_quantized_mlp():
    norm, mlp, drop_path = _branch()
    quantized = quantized_dynamically(mlp)
    x = torch.randn(2, 9, 8)
    expected = _expected(x, norm, quantized)  # the quantized layers, called
    with torch.no_grad():
        out = mlp_residual(x.clone(), norm, quantized, drop_path, False)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_with_autograd_the_residual_is_a_new_tensor_with_gradients():
    norm, mlp, drop_path = _branch()
    x = torch.randn(2, 10, 8, requires_grad=True)
    out = mlp_residual(x, norm, mlp, drop_path, training=False)
    assert out.data_ptr() != x.data_ptr()
    torch.testing.assert_close(out, _expected(x, norm, mlp))
    out.sum().backward()
    assert mlp.fc1.weight.grad is not None and x.grad is not None


def test_training_applies_drop_path_per_sample():
    norm, mlp, drop_path = _branch(training=True)
    x = torch.randn(64, 4, 8)
    torch.manual_seed(1)
    with torch.no_grad():
        out = mlp_residual(x, norm, mlp, drop_path, training=True)
    # each sample keeps its residual branch (scaled by 2) or drops it
    branch = mlp(norm(x))
    kept = torch.isclose(out, x + 2 * branch, atol=1e-6).all(dim=(1, 2))
    dropped = torch.isclose(out, x, atol=1e-6).all(dim=(1, 2))
    assert (kept | dropped).all()
    assert kept.any() and dropped.any()


def test_residual_sum_adds_into_the_fresh_tensor_without_autograd():
    fresh, other = torch.randn(2, 5, 3), torch.randn(1, 5, 3)
    expected = fresh + other
    with torch.no_grad():
        out = residual_sum(fresh, other)
    assert out.data_ptr() == fresh.data_ptr()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize('fresh, other', [
    (torch.randn(2, 3, dtype=torch.bfloat16), torch.randn(2, 3)),
    (torch.randn(1, 3), torch.randn(4, 3)),
])
def test_residual_sum_allocates_when_the_sum_would_not_fit(fresh, other):
    before = fresh.clone()
    with torch.no_grad():
        out = residual_sum(fresh, other)
    assert out.dtype == torch.result_type(fresh, other)
    assert out.shape == torch.broadcast_shapes(fresh.shape, other.shape)
    torch.testing.assert_close(fresh, before)


@pytest.mark.parametrize('hook', [None, 'own', 'submodule', 'global'])
def test_residual_sum_allocates_when_a_hook_of_the_makers_may_keep_fresh(
        hook):
    maker = nn.Sequential(nn.Linear(3, 3))
    hooked = {'own': maker, 'submodule': maker[0]}.get(hook)
    if hooked is not None:
        hooked.register_forward_hook(lambda *args: None)
    fresh, other = torch.randn(2, 3), torch.randn(2, 3)
    before = fresh.clone()
    handle = (nn.modules.module.register_module_forward_hook(
        lambda *args: None) if hook == 'global' else None)
    try:
        with torch.no_grad():
            out = residual_sum(fresh, other, nn.Identity(), maker)
    finally:
        if handle is not None:
            handle.remove()
    torch.testing.assert_close(out, before + other)
    assert (out.data_ptr() == fresh.data_ptr()) is (hook is None)
    if hook is not None:
        torch.testing.assert_close(fresh, before, atol=0, rtol=0)


def test_residual_sum_with_autograd_allocates_the_sum():
    branch = torch.randn(2, 3, requires_grad=True) * 2
    other = torch.randn(2, 3)
    before = branch.detach().clone()
    out = residual_sum(branch, other)
    assert out.data_ptr() != branch.data_ptr()
    torch.testing.assert_close(branch.detach(), before)
    torch.testing.assert_close(out, before + other)


def _token_map(layout):
    """A (2, 6, 5, 4) map laid out as the backbones produce them."""
    tokens = torch.randn(2, 20, 12, dtype=torch.float64)
    if layout == 'tokens':  # channels-last view of (B, N, C) tokens
        return tokens_to_map(tokens[..., :6].contiguous(), (5, 4))
    if layout == 'strided':  # a slice of a fused projection
        return tokens_to_map(tokens[..., 6:], (5, 4))
    return tokens_to_map(tokens[..., :6], (5, 4)).contiguous()


@pytest.mark.parametrize('layout', ['tokens', 'strided', 'nchw'])
@pytest.mark.parametrize('groups, kernel, stride', [(6, 3, 1), (1, 2, 2)])
def test_channels_last_conv_is_conv2d(layout, groups, kernel, stride):
    conv = nn.Conv2d(6, 6, kernel, stride, padding=kernel // 2,
                     groups=groups).double()
    ours = ChannelsLastConv2d(6, 6, kernel, stride, padding=kernel // 2,
                              groups=groups).double()
    ours.load_state_dict(conv.state_dict())
    x = _token_map(layout).requires_grad_()
    out = ours(x)
    expected = conv(x)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(expected)
    inputs = (x, ours.weight, ours.bias)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, (x, conv.weight, conv.bias), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # tokens of the output are a view, not a copy
    assert map_to_tokens(out).is_contiguous()
    assert ours.weight.is_contiguous()  # the parameter keeps its layout
    assert list(ours.state_dict()) == list(conv.state_dict())


class _Residuals(nn.Module):
    """``residual_sum`` then ``mlp_residual``, as a block's forward."""

    def __init__(self):
        super().__init__()
        self.norm, self.mlp, self.drop_path = _branch()

    def forward(self, x):
        x = residual_sum(x * 2, x)
        return mlp_residual(x, self.norm, self.mlp, self.drop_path,
                            self.training)


def test_exported_residuals_follow_a_dynamic_token_count(monkeypatch):
    # 4-token chunks: the in-place loop's length would depend on the size
    monkeypatch.setattr(layers, 'MLP_CHUNK_BYTES', 4 * 32 * 4)
    model = _Residuals().eval()
    tokens = torch.export.Dim('tokens', min=2, max=1024)
    with torch.no_grad():
        program = torch.export.export(
            model, (torch.randn(1, 10, 8), ),
            dynamic_shapes=({1: tokens}, ),
            strict=False)
        x = torch.randn(1, 37, 8)
        torch.testing.assert_close(program.module()(x), model(x))


def test_compiled_residuals_are_one_graph_for_any_token_count(monkeypatch):
    # torch.compile plans its own buffers: neither the in-place sum (its
    # dtype check breaks a graph) nor the chunk loop (its length follows the
    # size) is traced
    monkeypatch.setattr(layers, 'MLP_CHUNK_BYTES', 4 * 32 * 4)
    model = _Residuals().eval()
    graphs = []  # every graph Dynamo hands to the backend

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(
        model, backend=counting_backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for tokens in (10, 37):
            x = torch.randn(1, tokens, 8)
            torch.testing.assert_close(compiled(x), model(x))
    assert len(graphs) == 1


@pytest.mark.parametrize('contiguous', [True, False])
def test_tokens_to_nchw_is_the_contiguous_map_with_gradients(contiguous):
    tokens = torch.randn(2, 3 * 5, 4, dtype=torch.float64, requires_grad=True)
    x = tokens if contiguous else tokens[:, :, :3]
    out = tokens_to_nchw(x, (3, 5))
    expected = tokens_to_map(x, (3, 5))
    assert out.is_contiguous()
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    ours, = torch.autograd.grad(out, tokens, grad)
    want, = torch.autograd.grad(expected, tokens, grad)
    assert torch.equal(ours, want)


@pytest.mark.parametrize('bias_shape', [(2, 5, 7), (1, 2, 5, 7), (5, 7)])
def test_biased_attention_hands_sdpa_a_4d_mask_in_the_query_dtype(
        sdpa_masks, bias_shape):
    query = torch.randn(3, 2, 5, 4, dtype=torch.bfloat16)
    key, value = torch.randn(2, 3, 2, 7, 4, dtype=torch.bfloat16)
    bias = torch.randn(bias_shape)
    out = biased_attention(query, key, value, bias, 0.5)
    (mask, ) = sdpa_masks
    assert mask.dim() == 4 and mask.dtype == torch.bfloat16
    logits = 0.5 * query.float() @ key.float().transpose(-1, -2) + bias
    torch.testing.assert_close(
        out.float(), logits.softmax(-1) @ value.float(), atol=3e-2,
        rtol=3e-2)


@pytest.mark.parametrize('mode', [torch.inference_mode, torch.no_grad])
def test_plain_tensors_are_made_without_autograd_nor_inference_mode(mode):
    weight = torch.ones(3, requires_grad=True)
    with mode():
        with layers.plain_tensors():
            made = weight * 2
        after = torch.ones(3)
    assert not made.is_inference() and not made.requires_grad
    assert after.is_inference() == (mode is torch.inference_mode)


@pytest.mark.parametrize('value, multiple, expected', [(81, 16, 96),
                                                       (96, 16, 96),
                                                       (1, 16, 16),
                                                       (0, 16, 0),
                                                       (799, 32, 800)])
def test_round_up_to_a_multiple(value, multiple, expected):
    assert round_up(value, multiple) == expected
