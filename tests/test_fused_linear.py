"""Tests of the oneDNN products with bias and activation in their epilogue
(agent_mm/models/fused_linear.py)."""
import pytest
import torch
import torch.nn as nn

from agent_mm.models import fused_linear as module
from agent_mm.models.fused_linear import (FLOAT32_MAX_WIDTH, NO_ACTIVATION,
                                          activation_epilogue, fused_linear,
                                          fuses_epilogues)

CPU = torch.device('cpu')


@pytest.mark.parametrize('act, expected', [
    (nn.GELU(), ('gelu', 'none')),
    (nn.GELU(approximate='tanh'), ('gelu', 'tanh')),
    (nn.ReLU(), ('relu', '')),
    (nn.SiLU(), None),
    (nn.Identity(), None),
])
def test_activation_epilogue_names_what_onednn_can_apply(act, expected):
    assert activation_epilogue(act) == expected


def _onednn_bfloat16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_fusion_is_taken_for_bfloat16_and_narrow_float32_on_the_cpu():
    onednn = torch.backends.mkldnn.is_available()
    assert fuses_epilogues(torch.bfloat16, CPU, 768) == _onednn_bfloat16()
    assert fuses_epilogues(torch.float32, CPU, FLOAT32_MAX_WIDTH) == onednn
    assert not fuses_epilogues(torch.float32, CPU, FLOAT32_MAX_WIDTH + 1)
    assert not fuses_epilogues(torch.float16, CPU, 64)
    assert not fuses_epilogues(torch.bfloat16, torch.device('meta'), 64)
    assert not fuses_epilogues(torch.float32, torch.device('meta'), 64)


def test_no_fusion_without_the_onednn_op(monkeypatch):
    monkeypatch.setattr(module, '_LINEAR_POINTWISE', None)
    assert not fuses_epilogues(torch.bfloat16, CPU, 64)
    assert not fuses_epilogues(torch.float32, CPU, 64)


def test_no_fusion_within_torch_compile():
    seen = []

    @torch.compile(backend='eager', fullgraph=True)
    def traced(x):
        seen.append(fuses_epilogues(torch.float32, CPU, 64))
        return x + 1

    traced(torch.zeros(2))
    assert seen == [False]


@pytest.mark.filterwarnings('ignore:TF32 acceleration')
def test_no_fusion_where_onednn_is_turned_off():
    with torch.backends.mkldnn.flags(enabled=False):
        assert not fuses_epilogues(torch.bfloat16, CPU, 64)
        assert not fuses_epilogues(torch.float32, CPU, 64)


def _reference(x, weight, bias, act):
    """``act(x wᵀ + b)`` on the float32 sums, rounded to ``x``'s dtype."""
    out = x.float() @ weight.float().t()
    if bias is not None:
        out = out + bias.float()
    return act(out).to(x.dtype)


# the dtypes the layers hand to fused_linear on this CPU (bfloat16 only where
# oneDNN multiplies it: which one it is, the test above checks)
FUSED_DTYPES = [
    dtype for dtype in (torch.float32, torch.bfloat16)
    if fuses_epilogues(dtype, CPU, 24)
]


@pytest.mark.parametrize('act', [
    nn.Identity(), nn.GELU(), nn.GELU(approximate='tanh'), nn.ReLU()
])
@pytest.mark.parametrize('dtype', FUSED_DTYPES)
@pytest.mark.parametrize('bias', [True, False])
def test_fused_linear_applies_bias_and_activation_in_the_dtypes_it_serves(
        act, dtype, bias):
    torch.manual_seed(0)
    x = torch.randn(37, 24).to(dtype)
    weight = torch.randn(40, 24).div(5).to(dtype)
    bias = torch.randn(40).to(dtype) if bias else None
    epilogue = activation_epilogue(act) or NO_ACTIVATION
    out = fused_linear(x, weight, bias, epilogue)
    assert out.shape == (37, 40) and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        out, _reference(x, weight, bias, act), atol=tolerance,
        rtol=tolerance)
