"""The agent attentions a model's forward calls, each with the token grid it
attends over: the problems of ``benchmark_attention_kernels.py`` and the
maps of ``benchmark_bias_maps.py``."""
from typing import List, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..models.agent_attention import AgentAttention

AttentionCalls = List[Tuple[AgentAttention, Tuple[int, int]]]


def attention_calls(model: nn.Module, inputs: Tensor) -> AttentionCalls:
    """Every :class:`AgentAttention` call of ``model``'s forward of
    ``inputs`` (without autograd), with its token grid, in call order."""
    calls: AttentionCalls = []

    def record(module: AgentAttention, args: tuple, kwargs: dict) -> None:
        hw_shape = kwargs['hw_shape'] if 'hw_shape' in kwargs else args[1]
        calls.append((module, tuple(hw_shape)))

    hooks = [
        module.register_forward_pre_hook(record, with_kwargs=True)
        for module in model.modules() if isinstance(module, AgentAttention)
    ]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return calls
