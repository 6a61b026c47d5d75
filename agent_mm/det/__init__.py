"""mmdet-specific pieces (imported on demand: ``import agent_mm.det``)."""
from .mask_head import ScaledInitFCNMaskHead

__all__ = ['ScaledInitFCNMaskHead']
