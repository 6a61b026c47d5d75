"""mmdet-specific pieces (imported on demand: ``import agent_mm.det``)."""
from .mask_head import ScaledInitFCNMaskHead
from .roi_align import SparseRoIAlign

__all__ = ['ScaledInitFCNMaskHead', 'SparseRoIAlign']
