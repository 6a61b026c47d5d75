"""The shapes data set for mmdet (COCO instances, generated on first use)."""
from typing import List, Optional

from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS

from .shapes import ensure_shapes


@DATASETS.register_module()
class ShapesDetDataset(CocoDataset):
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

    def __init__(self,
                 *args,
                 generate: Optional[dict] = None,
                 **kwargs) -> None:
        self._generate_kwargs = dict(generate or {})
        super().__init__(*args, **kwargs)

    def load_data_list(self) -> List[dict]:
        """Generate the data set if needed, then load its annotations."""
        if not self.data_root:
            raise ValueError(f'{type(self).__name__} needs a data_root to '
                             'generate the shapes data set in')
        ensure_shapes(self.data_root, **self._generate_kwargs)
        return super().load_data_list()
