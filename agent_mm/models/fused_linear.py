"""Linear layers whose bias and activation are applied in the product's
epilogue by oneDNN.

``torch.addmm`` first writes the broadcast bias into its whole output and
then adds the product into it, and an activation after it is one more pass
over the output: at the thin, tall products of the backbones at high
resolution those passes cost a good share of the product itself. oneDNN's
matmul (``torch.ops.mkldnn._linear_pointwise``, the op that PyTorch's
inductor fuses CPU linear layers into) adds the bias and applies the
activation to each block of the output while it is in the caches, and
rounds to the output dtype once, after the activation.

On a CPU with AMX, computing the inference MLPs this way brought a whole
Agent-PVT-T or Agent-Swin-T bfloat16 forward to 0.95-0.97 of its time. In
float32, oneDNN's products beat MKL's (``addmm``) on the narrow layers of
the first two stages and lost on the wide ones (768 -> 3072 channels:
1.21x), so :func:`fuses_epilogues` takes the fusion in float32 for MLPs at
most :data:`FLOAT32_MAX_WIDTH` channels wide (float32 forwards: Agent-PVT-T
0.95-0.97 of their time, Agent-Swin-T 0.98). See docs/benchmark/README.md,
"The MLP's bias and GELU in the product".
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

# absent from builds of PyTorch without oneDNN
_LINEAR_POINTWISE = getattr(torch.ops.mkldnn, '_linear_pointwise', None)
_BF16_SUPPORTED = getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', None)

# float32 MLPs up to this many input channels are fused (the first two
# stages of Agent-PVT and Agent-Swin)
FLOAT32_MAX_WIDTH = 192

# oneDNN's name and algorithm of the epilogue: none, only the bias
Epilogue = Tuple[str, str]
NO_ACTIVATION: Epilogue = ('none', '')


def activation_epilogue(act: nn.Module) -> Optional[Epilogue]:
    """The epilogue of :func:`fused_linear` that applies ``act`` (GELU,
    exact or tanh, and ReLU); None for any other activation."""
    if type(act) is nn.GELU:
        return 'gelu', act.approximate
    if type(act) is nn.ReLU:
        return 'relu', ''
    return None


def fuses_epilogues(dtype: torch.dtype, device: torch.device,
                    width: int) -> bool:
    """Whether inference computes the products of an MLP ``width`` input
    channels wide, in ``dtype`` on ``device``, with :func:`fused_linear`:
    on a CPU where PyTorch's oneDNN has the op, in bfloat16 where oneDNN
    supports it, and in float32 up to :data:`FLOAT32_MAX_WIDTH` channels,
    where it was measured to pay; not where oneDNN is turned off
    (``torch.backends.mkldnn.flags(enabled=False)``), nor within
    ``torch.compile``: inductor makes such fusions itself, and it cannot
    lower this op with an activation as called here."""
    # is_compiling first: the oneDNN queries would break the traced graph
    if (torch.compiler.is_compiling() or device.type != 'cpu'
            or _LINEAR_POINTWISE is None
            or not torch.backends.mkldnn.is_available()
            or not torch.backends.mkldnn.enabled):
        return False
    if dtype == torch.float32:
        return width <= FLOAT32_MAX_WIDTH
    return (dtype == torch.bfloat16 and _BF16_SUPPORTED is not None
            and _BF16_SUPPORTED())


def fused_linear(x: Tensor,
                 weight: Tensor,
                 bias: Optional[Tensor],
                 epilogue: Epilogue = NO_ACTIVATION) -> Tensor:
    """``epilogue(x @ weight.T + bias)`` of 2-D ``x`` in one oneDNN product
    (see :func:`fuses_epilogues` for where it is available); ``x``,
    ``weight`` and ``bias`` in one dtype, no autograd.

    Args:
        x: ``(N, in)``.
        weight: ``(out, in)``.
        bias: ``(out, )`` or None.
        epilogue: :data:`NO_ACTIVATION` or :func:`activation_epilogue`'s.
    """
    attr, algorithm = epilogue
    return _LINEAR_POINTWISE(x, weight, bias, attr, [], algorithm)
