"""Whether a model is being traced into a graph, for the modules that take
another, graph-friendly branch then."""
import torch


def torch_exporting() -> bool:
    """Whether ``torch.export`` is tracing: ``torch.compiler.is_exporting``
    from PyTorch 2.7 on. Before it, ``is_compiling`` holds under both
    ``torch.export`` and ``torch.compile``, and only the latter traces with
    dynamo (as does ``torch.export``'s strict mode, which the deploy tools
    do not use)."""
    is_exporting = getattr(torch.compiler, 'is_exporting', None)
    if is_exporting is None:
        return (torch.compiler.is_compiling()
                and not torch.compiler.is_dynamo_compiling())
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
