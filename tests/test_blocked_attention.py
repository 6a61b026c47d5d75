"""Blocked attention: blocks of rows that cover the logits within their
budget, the exact attention from them, and the choice of it over the fused
kernel only where it pays (bfloat16 inference on a CPU without AMX)."""
import threading

import pytest
import torch
import torch.nn.functional as F

from agent_mm.ops import blocked_attention as op_module
from agent_mm.ops.blocked_attention import (blocked_attention, prefers_blocks,
                                            row_blocks)


@pytest.mark.parametrize(
    'queries, keys, expected',
    [
        (400, 30, 25),  # many queries: blocks of 16 rows (1000 // 60)
        (700, 600, 700),  # a row exceeds the budget: one row a block
        (8, 900, 1),  # few queries over many keys: never split
    ])
def test_row_blocks_cover_every_row_once_within_the_budget(
        monkeypatch, queries, keys, expected):
    monkeypatch.setattr(op_module, 'BLOCK_BYTES', 1000)
    blocks = row_blocks(queries, keys, element_size=2)
    covered = torch.zeros(queries, dtype=torch.long)
    for rows in blocks:
        covered[rows] += 1
        if len(blocks) > 1:
            assert len(range(queries)[rows]) * keys * 2 <= max(1000, keys * 2)
    assert bool((covered == 1).all())
    assert len(blocks) == expected


def _inputs(batch, heads, queries, keys, dims=8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(batch, heads, n, dims, generator=gen)
                         for n in (queries, keys, keys))
    bias = torch.randn(heads, queries, keys, generator=gen)
    return tuple(t.to(dtype) for t in (query, key, value, bias))


def _reference(query, key, value, bias, scale):
    weights = (scale * query @ key.transpose(-2, -1) + bias).softmax(-1)
    return weights @ value


@pytest.mark.parametrize('queries, keys', [(300, 9), (9, 300)])
def test_blocked_attention_is_the_attention(monkeypatch, queries, keys):
    # a small budget makes several blocks of rows
    monkeypatch.setattr(op_module, 'BLOCK_BYTES', 4 * 9 * 40)
    query, key, value, bias = _inputs(2, 3, queries, keys)
    out = blocked_attention(query, key, value, bias, 0.3)
    expected = _reference(query, key, value, bias, 0.3)
    torch.testing.assert_close(out, expected)


def test_blocked_attention_reads_heads_split_from_channels():
    # (B, N, heads * d) tokens viewed as (B, heads, N, d), as the model
    # splits its projections
    query, key, value, bias = _inputs(2, 3, 50, 7)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2)
             for t in (query, key, value)]
    assert not views[0].is_contiguous()
    out = blocked_attention(*views, bias, 0.3)
    torch.testing.assert_close(out, _reference(query, key, value, bias, 0.3))


def test_the_heads_merge_without_a_copy_as_the_fused_kernels_do():
    # queries split from (B, N, heads * d) tokens, as the model splits them
    query, key, value, bias = _inputs(2, 3, 50, 7)
    query = query.transpose(1, 2).contiguous().transpose(1, 2)
    out = blocked_attention(query, key, value, bias, 0.3)
    fused = F.scaled_dot_product_attention(query, key, value, bias[None])
    assert out.shape == fused.shape == (2, 3, 50, 8)
    assert out.stride() == fused.stride()
    # (B, heads, L, d) laid out as (B, L, heads, d): (B, L, heads * d) is a
    # view of it (``view`` raises where merging would need a copy)
    out.transpose(1, 2).view(2, 50, 24)


def test_blocked_attention_in_bfloat16_is_close_to_float32():
    query, key, value, bias = _inputs(1, 2, 500, 49, dims=32)
    expected = F.scaled_dot_product_attention(
        query, key, value, attn_mask=bias.unsqueeze(0))
    out = blocked_attention(*(t.bfloat16() for t in (query, key, value, bias)),
                            32**-0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_a_bias_of_the_wrong_shape_is_named():
    query, key, value, bias = _inputs(1, 2, 6, 4)
    with pytest.raises(ValueError, match=r'\(heads, L, S\) = \(2, 6, 4\)'):
        blocked_attention(query, key, value, bias.transpose(1, 2), 1.)


@pytest.fixture
def cpu_without_amx(monkeypatch):
    monkeypatch.setattr(op_module, 'cpu_lacks_amx_for_bfloat16', lambda: True)


def test_blocks_are_preferred_for_bfloat16_inference_without_amx(
        cpu_without_amx):
    query, key = _inputs(1, 2, 6, 4, dtype=torch.bfloat16)[:2]
    assert prefers_blocks(query, key, dropout=0.)
    with torch.no_grad():
        assert prefers_blocks(query, key.requires_grad_(), dropout=0.)


@pytest.mark.parametrize('case', ['float32', 'dropout', 'autograd', 'amx'])
def test_the_fused_kernel_is_kept_elsewhere(monkeypatch, cpu_without_amx,
                                            case):
    dtype = torch.float32 if case == 'float32' else torch.bfloat16
    query, key = _inputs(1, 2, 6, 4, dtype=dtype)[:2]
    if case == 'autograd':
        key.requires_grad_()
    if case == 'amx':
        monkeypatch.setattr(op_module, 'cpu_lacks_amx_for_bfloat16',
                            lambda: False)
    dropout = 0.1 if case == 'dropout' else 0.
    assert not prefers_blocks(query, key, dropout=dropout)


@pytest.mark.parametrize('probes, lacks', [
    ({'_is_avx512_bf16_supported': True}, True),
    ({'_is_avx512_bf16_supported': True, '_is_amx_tile_supported': True},
     False),
    ({}, False),
])
def test_amx_probe(monkeypatch, probes, lacks):
    for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'):
        monkeypatch.setattr(
            torch.cpu, name, lambda value=probes.get(name, False): value,
            raising=False)
    op_module.cpu_lacks_amx_for_bfloat16.cache_clear()
    try:
        assert op_module.cpu_lacks_amx_for_bfloat16() is lacks
    finally:
        op_module.cpu_lacks_amx_for_bfloat16.cache_clear()


def test_fused_kernel_only_holds_the_choice_to_fused_within_it(
        cpu_without_amx):
    query, key = _inputs(1, 2, 6, 4, dtype=torch.bfloat16)[:2]
    with op_module.fused_kernel_only():
        with op_module.fused_kernel_only():
            assert not prefers_blocks(query, key, dropout=0.)
        assert not prefers_blocks(query, key, dropout=0.)
    assert prefers_blocks(query, key, dropout=0.)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('lacks_amx', [True, False])
def test_blocks_only_chooses_the_blocks_in_any_precision_on_any_cpu(
        monkeypatch, dtype, lacks_amx):
    monkeypatch.setattr(op_module, 'cpu_lacks_amx_for_bfloat16',
                        lambda: lacks_amx)
    query, key = _inputs(1, 2, 6, 4, dtype=dtype)[:2]
    with op_module.blocks_only():
        assert prefers_blocks(query, key, dropout=0.)
        # but never where they cannot run
        assert not prefers_blocks(query, key, dropout=0.1)
        assert not prefers_blocks(query, key.requires_grad_(), dropout=0.)
        with op_module.fused_kernel_only():
            assert not prefers_blocks(query, key.detach(), dropout=0.)
        assert prefers_blocks(query, key.detach(), dropout=0.)
    assert prefers_blocks(query, key.detach(), dropout=0.) is (
        lacks_amx and dtype == torch.bfloat16)


@pytest.mark.parametrize('hold', ['blocks_only', 'fused_kernel_only'])
def test_a_held_kernel_leaves_other_threads_their_own_choice(
        monkeypatch, hold):
    monkeypatch.setattr(op_module, 'cpu_lacks_amx_for_bfloat16', lambda: True)
    inputs = {
        dtype: _inputs(1, 2, 6, 4, dtype=dtype)[:2]
        for dtype in (torch.float32, torch.bfloat16)
    }

    def choices():
        return {
            dtype: prefers_blocks(query, key, dropout=0.)
            for dtype, (query, key) in inputs.items()
        }

    own = choices()  # the fused kernel in float32, the blocks in bfloat16
    seen = []
    with getattr(op_module, hold)():
        held = choices()
        thread = threading.Thread(target=lambda: seen.append(choices()))
        thread.start()
        thread.join()
    assert set(held.values()) == {hold == 'blocks_only'}
    assert seen == [own]
