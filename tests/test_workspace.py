"""Tests of the memory shared by bias maps built for one use
(agent_mm/models/workspace.py)."""
import pytest
import torch

from agent_mm.models import AgentPVT, AgentSwinTransformer, agent_attention
from agent_mm.models.agent_attention import AgentAttention
from agent_mm.models.workspace import reuses_memory, workspace_buffer

CPU = torch.device('cpu')


def _request(slot, numel, dtype=torch.float32):
    return workspace_buffer(slot, (numel, ), dtype, CPU)


def test_no_buffer_outside_a_workspace():
    assert _request('a', 4) is None


def test_buffers_grow_and_are_reused_within_a_workspace():

    @reuses_memory
    def forward():
        small = _request('a', 4)
        large = _request('a', 10)
        again = _request('a', 6)
        other = _request('b', 6)
        half = _request('a', 6, torch.bfloat16)
        assert large.data_ptr() == again.data_ptr()
        assert other.data_ptr() != large.data_ptr()
        assert half.dtype == torch.bfloat16
        return small, large

    small, large = forward()
    assert small.shape == (4, ) and large.shape == (10, )
    assert _request('a', 4) is None  # closed with the call


def test_an_inner_call_keeps_the_outer_workspace():
    inner = reuses_memory(lambda: _request('a', 4))

    @reuses_memory
    def outer():
        first = _request('a', 8)
        assert inner().data_ptr() == first.data_ptr()
        return _request('a', 8)

    assert outer() is not None


def test_a_failing_call_closes_the_workspace():

    @reuses_memory
    def fails():
        assert _request('a', 4) is not None
        raise RuntimeError('boom')

    with pytest.raises(RuntimeError, match='boom'):
        fails()
    assert _request('a', 4) is None


def _attention_modules(model):
    return [m for m in model.modules() if isinstance(m, AgentAttention)]


def _recorded_biases(monkeypatch, model, x, **settings):
    """Eval outputs of ``model(x)`` and the bias maps its attentions read."""
    for module in _attention_modules(model):
        for name, value in settings.items():
            setattr(module.bias_cache, name, value)
    maps = []
    attend = AgentAttention._attend_with_bias

    def record(self, query, key, value, bias, dropout):
        maps.append(bias)
        return attend(self, query, key, value, bias, dropout)

    monkeypatch.setattr(AgentAttention, '_attend_with_bias', record)
    with torch.no_grad():
        outs = model(x)
    monkeypatch.setattr(AgentAttention, '_attend_with_bias', attend)
    return outs, maps


BACKBONES = {
    'pvt': lambda: AgentPVT(arch='tiny', depths=[2, 1, 1, 1], init_cfg=None),
    'swin': lambda: AgentSwinTransformer(
        arch='tiny', depths=[2, 2, 1, 1], init_cfg=None),
}


@pytest.mark.parametrize('backbone', sorted(BACKBONES))
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_maps_for_one_use_share_memory_and_give_the_same_outputs(
        monkeypatch, backbone, dtype):
    model = BACKBONES[backbone]().eval()
    x = torch.randn(1, 3, 64, 96)
    for module in _attention_modules(model):  # every module builds maps
        module.fold_biases = False
    with torch.autocast('cpu', torch.bfloat16, enabled=dtype != torch.float32):
        outs, maps = _recorded_biases(monkeypatch, model, x, max_shapes=0)
        # the same forward with every tensor in memory of its own
        monkeypatch.setattr(agent_attention, 'workspace_buffer',
                            lambda *a: None)
        expected, own_maps = _recorded_biases(monkeypatch, model, x)
    # the projections in three products instead of one fused product
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref, atol=tolerance, rtol=tolerance)
    # two maps per module: agent-major ones in one buffer, token-major ones
    # in another
    assert len(maps) == 2 * len(_attention_modules(model))
    assert {m.dtype for m in maps} == {dtype}
    assert len({m.untyped_storage().data_ptr() for m in maps[0::2]}) < len(
        maps) // 2
    assert len({m.untyped_storage().data_ptr() for m in own_maps}) == len(
        own_maps)


def test_cached_maps_have_memory_of_their_own(monkeypatch):
    model = BACKBONES['pvt']().eval()
    x = torch.randn(1, 3, 64, 96)
    outs, maps = _recorded_biases(monkeypatch, model, x, admit_after=1)
    assert len({m.untyped_storage().data_ptr() for m in maps}) == len(maps)
    # a second forward reads the cache, which the first one did not
    # overwrite
    again, cached = _recorded_biases(monkeypatch, model, x)
    for out, ref in zip(again, outs):
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert all(a is b for a, b in zip(cached, maps))


@pytest.mark.parametrize('fused_qkv', [True, False])
@pytest.mark.parametrize('qkv_bias', [True, False])
def test_projections_in_a_workspace_are_contiguous_and_equal(
        fused_qkv, qkv_bias):
    attention = AgentAttention(
        16, 2, (4, 4), agent_num=4, agent_shape=(2, 2), fused_qkv=fused_qkv,
        qkv_bias=qkv_bias).eval()
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        expected = attention._project(x)
        projected = reuses_memory(attention._project)(x)
    for got, want in zip(projected, expected):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want)
    # one buffer holds the three
    assert len({p.untyped_storage().data_ptr() for p in projected}) == 1


def test_projections_with_autograd_are_the_layers_outputs():
    attention = AgentAttention(16, 2, (4, 4), agent_num=4, agent_shape=(2, 2))
    x = torch.randn(2, 12, 16, requires_grad=True)
    query, key, value = reuses_memory(attention._project)(x)
    assert query.grad_fn is not None
    assert key.untyped_storage().data_ptr() == value.untyped_storage(
    ).data_ptr()  # the kv layer's output, split
