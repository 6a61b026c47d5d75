"""Whether a model is being traced into a graph, for the modules that take
another, graph-friendly branch then."""
import torch


def exporting() -> bool:
    """Whether the model is being traced for export: ``torch.onnx.export``
    (either exporter), ``torch.export`` or ``torch.jit.trace``."""
    return (torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
            or torch.jit.is_tracing())


def tracing() -> bool:
    """Whether a graph is being traced: for export, or by
    ``torch.compile``."""
    return exporting() or torch.compiler.is_compiling()
