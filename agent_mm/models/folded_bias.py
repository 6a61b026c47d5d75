"""Agent attention's bias maps folded into the attention's dot products.

Each bias map is a product of low rank. The agents are bilinearly resized
from the ``p×p`` grid of bias agents, so the agent→token map ``(heads, n,
N)`` is ``A @ G``: ``A`` holds the ``(n, p²)`` weights of that resize
(:func:`~.bias_maps.agent_grid_matrix`) and ``G`` ``(heads, p², N)`` is the
map built for the ``p×p`` bias agents themselves; the token→agent map is
``G' @ Aᵀ`` the same way. A logit plus its bias, ``s·q·k + l·r``, is then
the scaled dot product of ``[q | l/s]`` and ``[k | r]``: the fused kernel
runs without a mask, on a head size of ``d + p²`` (rounded up and padded
with zeros; the values are padded too, as the CPU kernel takes one head
size for all three).

That trades a map of ``n`` values per token and head, written by its build
and read by the kernel, for ``p²`` more columns in both products. It pays
where the map would be built for one forward only (an input shape that the
bias cache does not hold) and is wide beside the head: in bfloat16 on a
2-core Intel Xeon with AMX, folding Agent-PVT's 784-agent stages (64-wide
heads, ``p² = 49``: width 128) took 0.89-0.93 of the time of a forward
that builds their maps, at 800×1344 and 1024² (docs/benchmark). Folding
its 144- and 256-agent stages, or any stage in float32 (where the wider
products cost more than the map), did not pay. :func:`folds_bias` holds
that rule.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .layers import round_up

# the folded head size is rounded up to a multiple of this
PAD_MULTIPLE = 16
# a map is folded when it has at least this many agents per column of the
# folded head
MIN_AGENTS_PER_COLUMN = 4


class FoldedBias(NamedTuple):
    """The two bias maps of an agent attention as low-rank factors:
    ``agent_to_token = agent_grid @ keysᵀ`` and ``token_to_agent = queries @
    agent_gridᵀ`` (per head)."""
    agent_grid: Tensor  # (n, p²)
    keys: Tensor  # (heads, N, p²)
    queries: Tensor  # (heads, N, p²)


def folded_width(head_dims: int, rank: int) -> int:
    """Head size of the folded products: ``head_dims + rank`` rounded up to
    :data:`PAD_MULTIPLE`."""
    return round_up(head_dims + rank, PAD_MULTIPLE)


def folds_bias(agents: int, head_dims: int, rank: int, dtype: torch.dtype,
               device: torch.device) -> bool:
    """Whether maps built for one forward are better folded into the dot
    products (:func:`folded_bias_attention`): in bfloat16 on the CPU (where
    it was measured), when the ``agents`` of the map are at least
    :data:`MIN_AGENTS_PER_COLUMN` times the folded head size."""
    return (device.type == 'cpu' and dtype == torch.bfloat16 and agents
            >= MIN_AGENTS_PER_COLUMN * folded_width(head_dims, rank))


def _concat_zero_padded(x: Tensor, extra: Optional[Tensor],
                        width: int) -> Tensor:
    """``[x | extra | 0]`` with a last dimension of ``width``, ``extra``
    broadcast over ``x``'s leading dimensions."""
    out = x.new_empty(*x.shape[:-1], width)
    end = x.shape[-1]
    out[..., :end] = x
    if extra is not None:
        out[..., end:end + extra.shape[-1]] = extra
        end += extra.shape[-1]
    out[..., end:].zero_()
    return out


def folded_bias_attention(query: Tensor, key: Tensor, value: Tensor,
                          bias_left: Tensor, bias_right: Tensor,
                          scale: float) -> Tensor:
    """``softmax(scale * q kᵀ + bias_left @ bias_rightᵀ) v`` by the fused
    kernel without a mask, the bias folded into the dot products.

    Args:
        query: ``(B, heads, L, d)``.
        key: ``(B, heads, S, d)``.
        value: ``(B, heads, S, d)``.
        bias_left: ``(L, r)`` or ``(heads, L, r)``.
        bias_right: ``(S, r)`` or ``(heads, S, r)``.
        scale: Factor of the dot products ``q·k``.

    Returns:
        ``(B, heads, L, d)`` (a view of a wider tensor).
    """
    width = folded_width(query.shape[-1], bias_left.shape[-1])
    out = F.scaled_dot_product_attention(
        _concat_zero_padded(query, bias_left / scale, width),
        _concat_zero_padded(key, bias_right, width),
        _concat_zero_padded(value, None, width),
        scale=scale)
    return out[..., :value.shape[-1]]
