"""Agents padded where they are the keys of the token→agent attention.

In the token→agent attention every query reads the ``n`` agents: they are
the keys and values of the attention kernel, which in bfloat16 on the CPU
runs faster for some key counts than for others (:func:`padded_agent_count`):

- PyTorch's fused kernel (CPUs with AMX) for a multiple of 16. On a 2-core
  Intel Xeon with AMX, the kernel alone at Agent-Swin-T's shapes (800×1344)
  took 0.75 of its time with its 81 agents padded to 96 and 0.80 with its
  196 agents padded to 208; the whole bfloat16 forward took 0.97
  (docs/benchmark). Float32 (0.92-1.02) and float16 (0.94-0.97) gained
  little, and nothing was measured on a GPU.
- The blocked kernel (:mod:`agent_mm.ops.blocked_attention`, CPUs with
  AVX512-BF16 and no AMX), whose softmax runs 32 bfloat16 at a time: rows
  that leave 16 or more keys over a multiple of 32 ran 1.5-3 times slower
  per row than the multiple of 32 above them, while a remainder of up to 9
  cost about nothing (2-core AMD EPYC, 16384 queries, 2 heads of 32
  channels: 144 keys 10.1 ms, 160 keys 6.4 ms; 196 keys 7.9 ms, 208 keys
  11.3 ms, 224 keys 8.3 ms). So there a count is padded to the multiple of
  32 above it when it leaves 16 or more over one (81 → 96, 144 → 160, 196
  stays); the fused kernel held to by :func:`~agent_mm.ops.
  blocked_attention.fused_kernel_only` reads the same count there.

A padded agent is a zero key and a zero value with the bias
:data:`PADDED_AGENT_BIAS` in the token→agent map. Its weight after the
softmax, ``exp(PADDED_AGENT_BIAS - m)`` for a row's largest logit ``m``,
is exactly zero in every float format unless the real logits of the row
are all below about -9900, so the attention is that of the ``n`` agents.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.blocked_attention import cpu_lacks_amx_for_bfloat16
from .layers import round_up

# agents as keys of the fused kernel are padded up to a multiple of this
KEY_MULTIPLE = 16
# the blocked kernel's softmax takes this many bfloat16 keys at a time ...
BLOCK_KEY_MULTIPLE = 32
# ... and a row is padded to its next multiple if it leaves this many over
LONG_REMAINDER = 16
# the bias of a padded agent, for every token
PADDED_AGENT_BIAS = -1e4


def padded_agent_count(agents: int, dtype: torch.dtype,
                       device: torch.device) -> int:
    """How many agents the token→agent map and the kernel's keys hold.

    In bfloat16 on the CPU (where it was measured to pay): ``agents``
    rounded up to :data:`BLOCK_KEY_MULTIPLE` if it leaves
    :data:`LONG_REMAINDER` or more over a multiple of it, on a CPU whose
    inference runs the blocked kernel
    (:func:`~agent_mm.ops.blocked_attention.cpu_lacks_amx_for_bfloat16`);
    rounded up to :data:`KEY_MULTIPLE` on any other. Elsewhere
    ``agents``.
    """
    if device.type != 'cpu' or dtype != torch.bfloat16:
        return agents
    if not cpu_lacks_amx_for_bfloat16():
        return round_up(agents, KEY_MULTIPLE)
    if agents % BLOCK_KEY_MULTIPLE >= LONG_REMAINDER:
        return round_up(agents, BLOCK_KEY_MULTIPLE)
    return agents


def pad_agents(x: Tensor,
               count: int,
               dim: int = -2,
               value: float = 0.) -> Tensor:
    """``x`` with entries of ``value`` appended along its agent dimension
    ``dim`` (negative: -2 for ``(..., n, d)`` keys or values, -1 for a bias
    map's agents last) up to ``count`` agents; ``x`` itself when it has
    them."""
    extra = count - x.shape[dim]
    if not extra:
        return x
    return F.pad(x, (0, 0) * (-1 - dim) + (0, extra), value=value)
