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

In bfloat16 on a CPU with AMX, computing the inference MLPs this way
brought a whole Agent-PVT-T or Agent-Swin-T forward to 0.95-0.97 of its
time. In float32, MKL's products (``addmm``) were faster than oneDNN's at
the widest layers of Agent-Swin-T, and its forward was not faster, so
:func:`fuses_epilogues` takes the fusion for bfloat16 on the CPU only
(docs/benchmark/README.md, "The MLP's bias and GELU in the product").
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

# absent from builds of PyTorch without oneDNN
_LINEAR_POINTWISE = getattr(torch.ops.mkldnn, '_linear_pointwise', None)
_BF16_SUPPORTED = getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', None)

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


def fuses_epilogues(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether inference computes products of ``dtype`` on ``device`` with
    :func:`fused_linear`: bfloat16 on a CPU where PyTorch's oneDNN has the
    op and supports bfloat16, where it was measured to pay, unless oneDNN
    is turned off (``torch.backends.mkldnn.flags(enabled=False)``). Not
    within ``torch.compile``: inductor makes such fusions itself, and it
    cannot lower this op with an activation as called here."""
    # is_compiling first: the oneDNN queries would break the traced graph
    return (not torch.compiler.is_compiling() and device.type == 'cpu'
            and dtype == torch.bfloat16 and _LINEAR_POINTWISE is not None
            and _BF16_SUPPORTED is not None
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and _BF16_SUPPORTED())


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
