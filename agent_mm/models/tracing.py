"""Whether a model is being traced into a graph, for the modules that take
another, graph-friendly branch then."""
import torch


def torch_exporting() -> bool:
    """Whether ``torch.export`` is tracing: ``torch.compiler.is_exporting``
    from PyTorch 2.7 on; before it, only ``is_compiling`` tells, and it
    also holds under ``torch.compile`` (which then takes the export branch
    too: the same numbers)."""
    is_exporting = getattr(torch.compiler, 'is_exporting', None)
    if is_exporting is None:
        return torch.compiler.is_compiling()
    return is_exporting()


def exporting() -> bool:
    """Whether the model is being traced for export: ``torch.onnx.export``
    (either exporter), ``torch.export`` or ``torch.jit.trace``."""
    return (torch.onnx.is_in_onnx_export() or torch_exporting()
            or torch.jit.is_tracing())


def tracing() -> bool:
    """Whether a graph is being traced: for export, or by
    ``torch.compile``."""
    return exporting() or torch.compiler.is_compiling()
