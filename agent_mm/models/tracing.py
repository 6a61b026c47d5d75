"""Whether a model is being traced into a graph, for the modules that take
another, graph-friendly branch then."""
import torch


def torch_exporting() -> bool:
    """Whether ``torch.export`` is tracing.

    PyTorch 2.7 added ``torch.compiler.is_exporting``, but its dynamo folds
    that call to True in every compiled graph (so ``torch.compile`` would
    take the export branch), where later releases read the flag behind it:
    the flag is read here. Before 2.7 only ``is_compiling`` tells, and it
    holds under ``torch.compile`` too, which alone traces with dynamo (as
    does ``torch.export``'s strict mode, which the deploy tools do not use).
    """
    flag = getattr(torch.compiler, '_is_exporting_flag', None)
    if flag is not None:
        return flag
    if hasattr(torch.compiler, 'is_exporting'):
        return torch.compiler.is_exporting()
    return (torch.compiler.is_compiling()
            and not torch.compiler.is_dynamo_compiling())


def exporting() -> bool:
    """Whether the model is being traced for export: ``torch.onnx.export``
    (either exporter), ``torch.export`` or ``torch.jit.trace``."""
    return (torch.onnx.is_in_onnx_export() or torch_exporting()
            or torch.jit.is_tracing())


def tracing() -> bool:
    """Whether a graph is being traced: for export, or by
    ``torch.compile``."""
    return exporting() or torch.compiler.is_compiling()
