"""The agent attentions of a forward (benchmark/attention_calls.py)."""
import torch

from agent_mm.benchmark.attention_calls import attention_calls
from agent_mm.benchmark.models import MODELS
from agent_mm.models import AgentAttention


def test_attention_calls_are_every_block_with_its_token_grid():
    model = MODELS['agent_pvt_t'].build().eval()
    calls = attention_calls(model, torch.randn(1, 3, 64, 96))
    # PVT-T: two blocks a stage, token grids of strides 4 to 32
    assert [grid for _, grid in calls] == [(16, 24)] * 2 + [(8, 12)] * 2 + [
        (4, 6)] * 2 + [(2, 3)] * 2
    modules = [m for m in model.modules() if isinstance(m, AgentAttention)]
    assert [module for module, _ in calls] == modules
    # the hooks are gone after the forward
    assert not any(m._forward_pre_hooks for m in modules)
