"""The synthetic shapes data set and its mmdet / mmseg dataset classes.

Importing this package imports mmdet and mmseg and registers
``ShapesDetDataset`` and ``ShapesSegDataset`` in their ``DATASETS``
registries; configs do so with
``custom_imports=dict(imports=['agent_mm.datasets'])``.
"""
from .shapes import ensure_shapes, generate_shapes
from .shapes_det import ShapesDetDataset
from .shapes_seg import ShapesSegDataset

__all__ = [
    'generate_shapes', 'ensure_shapes', 'ShapesDetDataset', 'ShapesSegDataset'
]
