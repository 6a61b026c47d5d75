"""The shapes data set for mmseg (label maps, generated on first use)."""
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from .generated import GeneratedOnFirstUse


@DATASETS.register_module()
class ShapesSegDataset(GeneratedOnFirstUse, BaseSegDataset):
    """Synthetic circles, squares and triangles for semantic segmentation.

    Label maps are ADE20K-style single-channel PNGs, but label 0 is a real
    class (background), so ``reduce_zero_label`` is False. The data set is
    generated under ``data_root`` by
    :func:`~agent_mm.datasets.shapes.ensure_shapes` when that folder does not
    exist or is incomplete. Use ``data_prefix`` =
    ``dict(img_path='images/{train,val}',
    seg_map_path='ann_semseg/{train,val}')``.

    Args:
        generate (dict, optional): Arguments of
            :func:`~agent_mm.datasets.shapes.generate_shapes` (``num_train``,
            ``img_size``, ``seed``...). Defaults to None (its defaults).
        **kwargs: Arguments of :class:`mmseg.datasets.BaseSegDataset`;
            ``data_root`` is required.
    """

    METAINFO = dict(
        classes=('background', 'circle', 'square', 'triangle'),
        palette=[[0, 0, 0], [220, 20, 60], [0, 128, 255], [255, 200, 0]])

    def __init__(self,
                 img_suffix: str = '.png',
                 seg_map_suffix: str = '.png',
                 reduce_zero_label: bool = False,
                 **kwargs) -> None:
        super().__init__(
            img_suffix=img_suffix,
            seg_map_suffix=seg_map_suffix,
            reduce_zero_label=reduce_zero_label,
            **kwargs)
