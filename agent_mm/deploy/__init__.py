"""Deployment: ONNX export of backbones and segmentors, checked in ONNX
Runtime (:mod:`.onnx`; needs the ``deploy`` extra only when called)."""
from .onnx import (Check, OrtRunError, SegmentorLogits, build_export_model,
                   check_onnx, check_shapes, export_onnx, require_deploy_extra)

__all__ = [
    'Check', 'OrtRunError', 'SegmentorLogits', 'build_export_model',
    'check_onnx', 'check_shapes', 'export_onnx', 'require_deploy_extra'
]
