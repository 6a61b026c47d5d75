"""Agents padded to a multiple of 16 where they are the fused kernel's keys.

In the token→agent attention every query reads the ``n`` agents: they are
the keys and values of PyTorch's fused kernel. In bfloat16 on the CPU that
kernel runs faster when the key count is a multiple of 16. On a 2-core
Intel Xeon with AMX, the kernel alone at Agent-Swin-T's shapes
(800×1344) took 0.75 of its time with its 81 agents padded to 96 and 0.80
with its 196 agents padded to 208; the whole bfloat16 forward took 0.97
(docs/benchmark). Float32 (0.92-1.02) and float16 (0.94-0.97) gained
little, and nothing was measured on a GPU: :func:`padded_agent_count`
holds that rule.

A padded agent is a zero key and a zero value with the bias
:data:`PADDED_AGENT_BIAS` in the token→agent map. Its weight after the
softmax, ``exp(PADDED_AGENT_BIAS - m)`` for a row's largest logit ``m``,
is exactly zero in every float format unless the real logits of the row
are all below about -9900, so the attention is that of the ``n`` agents.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from .layers import round_up

# agents as keys are padded up to a multiple of this
KEY_MULTIPLE = 16
# the bias of a padded agent, for every token
PADDED_AGENT_BIAS = -1e4


def padded_agent_count(agents: int, dtype: torch.dtype,
                       device: torch.device) -> int:
    """How many agents the token→agent map and the kernel's keys hold:
    ``agents`` rounded up to :data:`KEY_MULTIPLE` in bfloat16 on the CPU
    (where it was measured to pay), else ``agents``."""
    if device.type != 'cpu' or dtype != torch.bfloat16:
        return agents
    return round_up(agents, KEY_MULTIPLE)


def pad_agents(x: Tensor, count: int) -> Tensor:
    """``(..., n, d)`` agents (keys or values) with zero rows appended up to
    ``count``; ``x`` itself when it has ``count`` rows."""
    extra = count - x.shape[-2]
    return F.pad(x, (0, 0, 0, extra)) if extra else x
