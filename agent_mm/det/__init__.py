"""mmdet-specific pieces (imported on demand: ``import agent_mm.det``)."""
from .mask_head import PatchConvTranspose2d, ScaledInitFCNMaskHead
from .roi_align import SparseRoIAlign

__all__ = [
    'PatchConvTranspose2d', 'ScaledInitFCNMaskHead', 'SparseRoIAlign'
]
