"""Agent attention computed literally, as the authors do: the reference path
(``attn_impl='reference'``).

Every bias source is expanded to each image of the batch and resized in the
order the equations are written, and both attentions are plain
``softmax(scale * q kᵀ + bias) v`` whose weights autograd stores. It gives
the fast path's numbers and is its baseline in the benchmarks; use it for
debugging, not for speed.
"""
from typing import Optional, Tuple

import torch.nn as nn
from torch import Tensor

from .bias_maps import resize, to_agent_grid


def literal_biases(attn: nn.Module, hw_shape: Tuple[int, int],
                   batch: int) -> Tuple[Tensor, Tensor]:
    """Agent→token ``(B, heads, n, N)`` and token→agent ``(B, heads, N, n)``
    biases of an :class:`~agent_mm.models.AgentAttention` for a batch.

    Each bias is the sum of two sources, a 7×7 one per agent and the broadcast
    sum of a row and a column one, each resized to the token grid and its
    agent axis to the agent grid.
    """
    agent_to_token = (attn.an_bias, (attn.ah_bias + attn.aw_bias).squeeze(0))
    token_to_agent = (attn.na_bias,
                      (attn.ha_bias + attn.wa_bias).squeeze(0).permute(
                          0, 3, 1, 2))

    def per_image(sources: Tuple[Tensor, Tensor]) -> Tensor:
        return sum(
            to_agent_grid(
                resize(src.repeat(batch, 1, 1, 1), hw_shape), attn.agent_shape)
            for src in sources)

    agent_bias = per_image(agent_to_token).transpose(1, 2)
    token_bias = per_image(token_to_agent)
    return (agent_bias.unflatten(0, (batch, attn.num_heads)),
            token_bias.unflatten(0, (batch, attn.num_heads)))


def literal_attention(query: Tensor, key: Tensor, value: Tensor, bias: Tensor,
                      scale: float, dropout: nn.Module) -> Tensor:
    """``dropout(softmax(scale * q kᵀ + bias)) v``, computed as written."""
    weights = (query * scale) @ key.transpose(-2, -1) + bias
    return dropout(weights.softmax(dim=-1)) @ value


def literal_agent_attention(attn: nn.Module,
                            query: Tensor,
                            key: Tensor,
                            value: Tensor,
                            agents: Tensor,
                            hw_shape: Tuple[int, int],
                            batch: Optional[int] = None) -> Tensor:
    """Both attentions of ``attn`` on ``(B, heads, *, d)`` queries, keys,
    values and agents: the agents gather from the keys and values, then
    the queries read from the agents. Returns ``(B, heads, N, d)``.

    Args:
        batch: Images whose :func:`literal_biases` are built: None for the
            ``B`` of ``query``, as written; 1 for one image's, broadcast over
            the batch (:mod:`.traced_agent_attention`).
    """
    if batch is None:
        batch = query.shape[0]
    agent_bias, token_bias = literal_biases(attn, hw_shape, batch)
    agent_value = literal_attention(agents, key, value, agent_bias, attn.scale,
                                    attn.attn_drop)
    return literal_attention(query, agents, agent_value, token_bias,
                             attn.scale, attn.attn_drop)
