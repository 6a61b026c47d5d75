"""FLOP counting shared by the analysis tools.

mmengine's ``FlopAnalyzer`` traces a model and counts one multiply-add as
one flop, but has no handle for ``aten::scaled_dot_product_attention``, so
fused attention would silently count as zero. :func:`flop_analyzer` returns
an analyzer that counts it (and ``aten::baddbmm``) like the matmuls of the
unfused form. mmengine is imported lazily: importing this module is cheap.
"""
from math import prod
from typing import Any, List, Tuple, Union

import torch.nn as nn
from torch import Tensor


def _shape(value: Any) -> List[int]:
    """Complete shape of a traced value (``torch._C.Value``)."""
    if not value.isCompleteTensor():
        raise ValueError(f'FLOP handle got a value without a complete '
                         f'shape: {value}.')
    return value.type().sizes()


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Multiply-adds of ``softmax(q kᵀ + mask) v``.

    ``q`` is ``(*batch, Lq, E)``, ``k`` ``(*batch, Lk, E)`` and ``v``
    ``(*batch, Lk, Ev)``: ``q kᵀ`` costs ``batch·Lq·Lk·E`` and the product
    with ``v`` ``batch·Lq·Lk·Ev``; softmax, scaling and the mask are
    element-wise and, as for every element-wise op in mmengine, not counted.
    """
    query, key, value = (_shape(v) for v in inputs[:3])
    *batch, len_q, dims = query
    len_k, value_dims = key[-2], value[-1]
    return prod(batch) * len_q * len_k * (dims + value_dims)


def baddbmm_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Multiply-adds of ``beta·M + alpha·(A @ B)`` for ``A (b, n, k)``."""
    batch, rows, inner = _shape(inputs[1])
    return batch * rows * inner * _shape(inputs[2])[-1]


EXTRA_FLOP_HANDLES = {
    'aten::scaled_dot_product_attention': sdpa_flop_jit,
    'aten::baddbmm': baddbmm_flop_jit,
}


def flop_analyzer(model: nn.Module,
                  inputs: Union[Tensor, Tuple[Any, ...]]) -> Any:
    """``mmengine.analysis.FlopAnalyzer`` with the attention handles, its
    tracer, unsupported-op and uncalled-module warnings silenced (read its
    ``unsupported_ops()`` instead).

    Args:
        model: Module to trace; run it in the mode (eval/no_grad) you want
            counted.
        inputs: Positional inputs of ``model``.

    Returns:
        The analyzer; ``.total()`` is in multiply-adds.
    """
    from mmengine.analysis import FlopAnalyzer
    analyzer = FlopAnalyzer(model, inputs).set_op_handle(**EXTRA_FLOP_HANDLES)
    analyzer.tracer_warnings('none')
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return analyzer


def top_level_flops(analyzer: Any) -> List[Tuple[str, int]]:
    """``(name, flops)`` of the model's direct children; those that ran no
    counted op are left out."""
    by_module = analyzer.by_module()
    return [(name, flops) for name, flops in by_module.items()
            if name and '.' not in name and flops]
