"""Attention with a shared bias: exact values and gradients whether the
bias is kept or rebuilt in backward, no attention map stored, and the bias
kept only when it is small."""
import pytest
import torch

from agent_mm.models import AgentAttention
from agent_mm.ops import shared_bias_attention as op_module


def _inputs(batch=2,
            heads=3,
            queries=11,
            keys=7,
            dims=5,
            value_dims=4,
            dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    return (rand(batch, heads, queries, dims), rand(batch, heads, keys, dims),
            rand(batch, heads, keys, value_dims), rand(heads, queries, keys))


def _identity(bias):
    return bias


def _low_rank(rows, cols):
    """A (heads, L, S) bias built from small sources, as agent biases are."""
    return rows @ cols


def _with_bias(query, key, value, bias, scale):
    return op_module.shared_bias_attention(query, key, value, scale, _identity,
                                           bias)


@pytest.fixture(params=['kept', 'rebuilt'])
def bias_path(request, monkeypatch):
    """Run a test with the bias kept for backward, then rebuilt there."""
    keep = request.param == 'kept'
    monkeypatch.setattr(op_module, 'keeps_bias', lambda query, key: keep)
    return request.param


def _literal(query, key, value, bias, scale):
    weights = (scale * query @ key.transpose(-2, -1) + bias).softmax(-1)
    return weights @ value


# equal head sizes take PyTorch's fused CPU kernel, unequal the fallback
@pytest.mark.parametrize('value_dims', [5, 4])
def test_matches_literal_attention(value_dims):
    inputs = _inputs(value_dims=value_dims, dtype=torch.float32)
    expected = _literal(*inputs, 0.3)
    torch.testing.assert_close(
        _with_bias(*inputs, 0.3), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('value_dims', [5, 4])
def test_gradients_match_autograd_of_literal_attention(value_dims, bias_path):
    inputs = _inputs(value_dims=value_dims)
    grad_out = torch.randn(2, 3, 11, value_dims, dtype=torch.float64)
    ours = torch.autograd.grad(_with_bias(*inputs, 0.7), inputs, grad_out)
    expected = torch.autograd.grad(_literal(*inputs, 0.7), inputs, grad_out)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want)


# the map is split along its longer axis: blocks of 1 or 3 query rows of 11
# (7 keys), or 1 or 3 key columns of 11 (7 queries), or the whole map;
# each block holds 2x3 (batch x heads) lines of 7 float64
@pytest.mark.parametrize('queries,keys', [(11, 7), (7, 11)])
@pytest.mark.parametrize('block', [1, 3, 11])
def test_blockwise_backward_matches_autograd_of_literal_attention(
        monkeypatch, queries, keys, block, bias_path):
    monkeypatch.setattr(op_module, 'BACKWARD_BLOCK_BYTES',
                        block * 2 * 3 * 7 * 8)
    query, key, value, bias = _inputs(queries=queries, keys=keys)
    blocks = op_module.backward_blocks(query, key)
    assert len(blocks) == -(-11 // block)
    split = [rows if queries > keys else cols for rows, cols in blocks]
    assert [(s.start, s.stop) for s in split
            ] == [(start, start + block) for start in range(0, 11, block)]
    # keys and values as strided views, as projections chunked in two are
    key_value = torch.cat([key, value], dim=-1).detach().requires_grad_()
    key, value = key_value.split([5, 4], dim=-1)
    inputs = (query, key_value, bias)
    grad_out = torch.randn(2, 3, queries, 4, dtype=torch.float64)
    ours = torch.autograd.grad(
        _with_bias(query, key, value, bias, 0.7), inputs, grad_out)
    expected = torch.autograd.grad(
        _literal(query, key, value, bias, 0.7), inputs, grad_out)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want)


def test_gradcheck(bias_path):
    inputs = _inputs(batch=2, heads=2, queries=4, keys=3, dims=3, value_dims=2)
    assert torch.autograd.gradcheck(lambda *args: _with_bias(*args, 0.5),
                                    inputs)


def test_gradients_reach_the_bias_sources(bias_path):
    query, key, value, _ = _inputs()
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 11, 2, generator=gen, dtype=torch.float64)
    cols = torch.randn(3, 2, 7, generator=gen, dtype=torch.float64)
    rows.requires_grad_()
    cols.requires_grad_()
    inputs = (query, key, value, rows, cols)
    grad_out = torch.randn(2, 3, 11, 4, dtype=torch.float64)
    ours = torch.autograd.grad(
        op_module.shared_bias_attention(query, key, value, 0.4, _low_rank,
                                        rows, cols), inputs, grad_out)
    expected = torch.autograd.grad(
        _literal(query, key, value, _low_rank(rows, cols), 0.4), inputs,
        grad_out)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize('bias_path,builds', [('kept', 1), ('rebuilt', 2)],
                         indirect=['bias_path'])
def test_bias_is_built_under_the_forwards_autocast(bias_path, builds):
    query, key, value, _ = _inputs(dtype=torch.float32, dims=4)
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 11, 2, generator=gen).requires_grad_()
    cols = torch.randn(3, 2, 7, generator=gen).requires_grad_()
    built = []

    def low_rank(rows, cols):
        bias = _low_rank(rows, cols)
        built.append(bias.dtype)
        return bias

    inputs = (query, key, value, rows, cols)
    grad_out = torch.randn(2, 3, 11, 4, generator=gen)
    with torch.autocast('cpu', torch.bfloat16):
        out = op_module.shared_bias_attention(
            *(x.to(torch.bfloat16) for x in (query, key, value)), 0.4,
            low_rank, rows, cols)
    ours = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    # built in forward, and again in backward unless kept: in bfloat16
    assert built == [torch.bfloat16] * builds
    expected = torch.autograd.grad(
        _literal(query, key, value, _low_rank(rows, cols), 0.4), inputs,
        grad_out)
    for got, want in zip(ours, expected):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)


def test_sum_over_batch_is_the_sum_over_the_first_dimension():
    x = torch.randn(3, 4, 5, 6)
    out = torch.empty(4, 6, 5).transpose(1, 2)
    op_module.sum_over_batch(x, out)
    torch.testing.assert_close(out, x.sum(0))


def test_frozen_bias_gets_no_gradient(bias_path):
    query, key, value, bias = _inputs()
    bias = bias.detach()
    out = _with_bias(query, key, value, bias, 1.0)
    out.sum().backward()
    assert bias.grad is None
    assert query.grad is not None and value.grad is not None


@pytest.mark.parametrize('batch,agents,kept', [(1, 12, False), (1, 6, True),
                                               (2, 12, True)])
def test_keeps_a_bias_no_larger_than_the_query_or_key(batch, agents, kept):
    # 8-dimensional heads: a bias of 12 agents over 10 tokens (or 10 tokens
    # over 12 agents) is larger than 1 image's query and key, not than 2's
    tokens = torch.zeros(batch, 3, 10, 8)
    agent_tokens = torch.zeros(batch, 3, agents, 8)
    assert op_module.keeps_bias(tokens, agent_tokens) is kept
    assert op_module.keeps_bias(agent_tokens, tokens) is kept


def _saved_shapes(*args):
    """Shapes of the tensors :func:`shared_bias_attention` (``args``)
    saves for backward."""
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op_module.shared_bias_attention(*args)
    return saved


def test_keeps_a_small_bias_but_no_attention_map():
    query, key, value, _ = _inputs(queries=13, keys=17, dims=8)
    rows = torch.randn(3, 13, 2, dtype=torch.float64, requires_grad=True)
    cols = torch.randn(3, 2, 17, dtype=torch.float64, requires_grad=True)
    assert op_module.keeps_bias(query, key)
    saved = _saved_shapes(query, key, value, 1.0, _low_rank, rows, cols)
    batch, heads = query.shape[:2]
    assert (batch, heads, 13, 17) not in saved  # attention map
    assert saved.count((heads, 13, 17)) == 1  # the bias, by the function
    # the function's inputs, output, log-sum-exp and bias; the bias's own
    # graph keeps the sources
    assert sorted(saved) == sorted([
        tuple(query.shape),
        tuple(key.shape),
        tuple(value.shape), (batch, heads, 13, value.shape[-1]),
        (batch, heads, 13), (heads, 13, 17),
        tuple(rows.shape),
        tuple(cols.shape)
    ])


def test_keeps_the_bias_in_the_querys_dtype():
    # float32 bias sources, a bfloat16 query and no autocast: the bias is
    # cast once, in forward, and its gradient comes back in float32
    query, key, value = (x.detach().to(torch.bfloat16).requires_grad_()
                         for x in _inputs(queries=13, keys=17, dims=8)[:3])
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 13, 2, generator=gen).requires_grad_()
    cols = torch.randn(3, 2, 17, generator=gen).requires_grad_()
    assert op_module.keeps_bias(query, key)
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = op_module.shared_bias_attention(query, key, value, 8**-0.5,
                                              _low_rank, rows, cols)
    assert ((3, 13, 17), torch.bfloat16) in saved
    assert ((3, 13, 17), torch.float32) not in saved
    grad_out = torch.randn(out.shape, generator=gen).to(out.dtype)
    ours = torch.autograd.grad(out, (rows, cols), grad_out)
    expected = torch.autograd.grad(
        _literal(*(x.float() for x in (query, key, value)),
                 _low_rank(rows, cols), 8**-0.5), (rows, cols),
        grad_out.float())
    for got, want in zip(ours, expected):
        assert got.dtype == torch.float32
        # bfloat16 rounding of the attention and of the bias gradient
        assert (got - want).norm() <= 0.05 * want.norm()


def test_saves_neither_a_large_bias_nor_the_attention_map():
    query, key, value, _ = _inputs(queries=13, keys=17)
    rows = torch.randn(3, 13, 2, dtype=torch.float64, requires_grad=True)
    cols = torch.randn(3, 2, 17, dtype=torch.float64, requires_grad=True)
    assert not op_module.keeps_bias(query, key)
    saved = _saved_shapes(query, key, value, 1.0, _low_rank, rows, cols)
    batch, heads = query.shape[:2]
    assert (batch, heads, 13, 17) not in saved  # attention map
    assert (heads, 13, 17) not in saved  # bias
    # inputs, output, row-wise log-sum-exp, bias sources
    assert sorted(saved) == sorted([
        tuple(query.shape),
        tuple(key.shape),
        tuple(value.shape), (batch, heads, 13, value.shape[-1]),
        (batch, heads, 13),
        tuple(rows.shape),
        tuple(cols.shape)
    ])


@pytest.mark.parametrize('bias_shape', [(3, 11), (1, 3, 11, 7), (3, 11, 6)])
def test_rejects_bias_of_wrong_shape(bias_shape):
    query, key, value, _ = _inputs()
    with pytest.raises(ValueError, match=r'bias must have shape'):
        _with_bias(query, key, value, torch.zeros(bias_shape), 1.)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_unfused_weights_sum_to_one_in_half_precision(monkeypatch, dtype):
    # the path of GPUs (and of unequal head sizes): log-sum-exps of 8 to 42,
    # rounded to bfloat16 in steps of up to 1/4, made rows of weights sum
    # to 0.89-1.11; the attention of values all one must be one
    monkeypatch.setattr(op_module, '_FLASH_CPU', None)
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 200, 16, generator=gen) * 3
    key = torch.randn(2, 3, 50, 16, generator=gen) * 3
    bias = torch.randn(3, 200, 50, generator=gen) * 2
    ones = torch.ones(2, 3, 50, 16)
    out = op_module.shared_bias_attention(
        *(x.to(dtype) for x in (query, key, ones)), 0.25, _identity,
        bias.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), torch.ones_like(out.float()),
                               atol=2**-7, rtol=0)


def _large_logit_inputs(dtype, bias_offset=0.):
    """Queries and keys along one shared direction: logits of about 1000,
    each row spread over about 35, as trained agent attention can reach
    (the segmentation quick-start's last stage reached 2320), plus
    ``bias_offset`` in every logit through the bias."""
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(64, generator=gen)
    shared = shared / shared.norm() * 40
    query = 5 * shared + 0.3 * torch.randn(2, 2, 16, 64, generator=gen)
    key = shared + 0.3 * torch.randn(2, 2, 49, 64, generator=gen)
    value = torch.randn(2, 2, 49, 64, generator=gen)
    bias = 0.1 * torch.randn(2, 16, 49, generator=gen) + bias_offset
    return [x.to(dtype).requires_grad_() for x in (query, key, value, bias)]


# 9000 more in every logit puts -lse / scale (8 × 10000) beyond float16's
# 65504: the weights were inf or nan
@pytest.mark.parametrize('bias_offset', [0., 9000.])
@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_gradients_hold_for_large_logits(
        monkeypatch, dtype, fused, bias_offset):
    # the backward rebuilt the weights from logits rounded to bfloat16
    # (steps of 4 at 1000, or 1/2 in float16): they disagreed with the
    # forward's by up to e² and the gradients of the value and the bias were
    # off by 48 % and 290 % (14-20 % in float16)
    if not fused:
        monkeypatch.setattr(op_module, '_FLASH_CPU', None)
    inputs = _large_logit_inputs(dtype, bias_offset)
    exact = [x.detach().double().requires_grad_() for x in inputs]
    grad_out = torch.randn(2, 2, 16, 64,
                           generator=torch.Generator().manual_seed(1))
    scale = 64**-0.5
    got = torch.autograd.grad(
        _with_bias(*inputs, scale), inputs, grad_out.to(dtype))
    expected = torch.autograd.grad(
        _literal(*exact, scale), exact, grad_out.double())
    query_error, key_error, value_error, bias_error = (
        float((g.double() - e).norm() / e.norm())
        for g, e in zip(got, expected))
    assert value_error < 0.02 and bias_error < 0.02
    # the gradients of queries and keys are small differences of large
    # products (the rows' shared direction cancels), the least exact in
    # half precision: up to 25 % in bfloat16, against 2.4-50 before
    assert query_error < 0.5 and key_error < 0.5


@pytest.mark.parametrize('bias_offset', [0., 9000.])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_rebuilt_weights_sum_to_one_whatever_the_logits(dtype, bias_offset):
    # the weights the backward pass rebuilds from the exact log-sum-exp of
    # logits of about 1000 and 10000: each row sums to 1 within the
    # rounding of its weights (2^-8 in bfloat16). With -lse / scale carried
    # by two bfloat16 columns, the rows summed to 0.983-1.029 at 10000; in
    # float16 beyond 8188 they overflowed
    query, key, _, bias = (x.detach()
                           for x in _large_logit_inputs(dtype, bias_offset))
    scale = 64**-0.5
    logits = query.double() @ key.double().transpose(-2, -1) * scale
    lse = torch.logsumexp(logits + bias.double(), dim=-1)
    whole = slice(None)
    weights = op_module._weight_blocks(query, key, bias, scale,
                                       lse.float())(whole, whole)
    assert weights.dtype == dtype
    row_sums = weights.double().sum(dim=-1)
    tolerance = 2**-8 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(
        row_sums, torch.ones_like(row_sums), atol=tolerance, rtol=0)


def test_bfloat16_bias_gradients_of_agent_attention_are_close_to_float32():
    # Agent-PVT's first stage at 256² (4096 tokens, 144 agents): with the
    # weights rebuilt from the log-sum-exp within the product and the row
    # sums in float32, the relative error of the bias gradients against
    # float32 is 1.1 % (agent→token) and 6.5 % (token→agent); from logits,
    # log-sum-exp and row sums rounded to bfloat16 it was 2.4 % and 12 %
    torch.manual_seed(0)
    attn = AgentAttention(64, 1, pretrain_grid=(56, 56), agent_num=49,
                          agent_shape=(12, 12)).train()
    hw = (64, 64)
    x = torch.randn(2, 64 * 64, 64)
    grad_out = torch.randn(2, 64 * 64, 64)

    def bias_gradients(dtype: torch.dtype):
        attn.zero_grad()
        with torch.autocast('cpu', dtype=dtype,
                            enabled=dtype != torch.float32):
            out = attn(x, hw)
        out.float().backward(grad_out)
        return [attn.an_bias.grad.clone(), attn.na_bias.grad.clone()]

    expected = bias_gradients(torch.float32)
    got = bias_gradients(torch.bfloat16)
    agent_to_token, token_to_agent = (
        float((g - e).norm() / e.norm()) for g, e in zip(got, expected))
    assert agent_to_token < 0.018
    assert token_to_agent < 0.09


def test_an_empty_batch_gets_zero_gradients_of_the_right_shapes():
    query, key, value, _ = _inputs(batch=0)
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 11, 2, generator=gen, dtype=torch.float64)
    cols = torch.randn(3, 2, 7, generator=gen, dtype=torch.float64)
    inputs = (query, key, value, rows.requires_grad_(),
              cols.requires_grad_())
    out = op_module.shared_bias_attention(query, key, value, 0.4, _low_rank,
                                          rows, cols)
    assert out.shape == (0, 3, 11, 4)
    grads = torch.autograd.grad(out.sum(), inputs)
    for grad, tensor in zip(grads, inputs):
        assert torch.equal(grad, torch.zeros_like(tensor))
