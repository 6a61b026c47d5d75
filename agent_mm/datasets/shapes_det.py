"""The shapes data set for mmdet (COCO instances, generated on first use)."""
from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS

from .generated import GeneratedOnFirstUse


@DATASETS.register_module()
class ShapesDetDataset(GeneratedOnFirstUse, CocoDataset):
    """Synthetic circles, squares and triangles in COCO instance format.

    The data set is generated under ``data_root`` by
    :func:`~agent_mm.datasets.shapes.ensure_shapes` when that folder does not
    exist or is incomplete, so training needs no download. Use ``ann_file`` =
    ``'annotations/instances_{train,val}.json'`` and ``data_prefix`` =
    ``dict(img='images/{train,val}/')``.

    Args:
        generate (dict, optional): Arguments of
            :func:`~agent_mm.datasets.shapes.generate_shapes` (``num_train``,
            ``img_size``, ``seed``...). Defaults to None (its defaults).
        **kwargs: Arguments of :class:`mmdet.datasets.CocoDataset`;
            ``data_root`` is required.
    """

    METAINFO = {
        'classes': ('circle', 'square', 'triangle'),
        'palette': [(220, 20, 60), (0, 128, 255), (255, 200, 0)]
    }
