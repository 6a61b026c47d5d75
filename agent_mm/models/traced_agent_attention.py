"""Agent attention in a graph traced for export (``torch.onnx.export``,
``torch.export``, ``torch.jit.trace``): the branch that
:class:`~agent_mm.models.AgentAttention` takes by itself while
:func:`~agent_mm.models.tracing.exporting`.

The fast path's tools do not trace: its :class:`BiasCache` would bake the
maps of the traced shape into the graph, its training autograd function is
an opaque Python operation to the exporters, and the exporters lose the
batch size of the fused kernel's broadcast mask. Here everything is plain
tensor operations: the biases are one image's literal biases (resized by
the exporters' own ``Resize``, a few operations per source, so the graph
stays small and follows dynamic sizes), built once per call and broadcast
over the batch, and both attentions are written out.
"""
from typing import Tuple

import torch.nn as nn
from torch import Tensor

from .literal_agent_attention import literal_agent_attention


def traced_agent_attention(attn: nn.Module, query: Tensor, key: Tensor,
                           value: Tensor, agents: Tensor,
                           hw_shape: Tuple[int, int]) -> Tensor:
    """Both attentions of the :class:`~agent_mm.models.AgentAttention`
    ``attn`` on ``(B, heads, *, d)`` queries, keys, values and agents, as
    the fast path computes them; returns ``(B, heads, N, d)``."""
    return literal_agent_attention(
        attn, query, key, value, agents, hw_shape, batch=1)
