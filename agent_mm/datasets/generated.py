"""The part shared by the shapes dataset classes of mmdet and mmseg: the
data set is generated under ``data_root`` before its annotations load."""
from typing import List, Optional

from .shapes import ensure_shapes


class GeneratedOnFirstUse:
    """Mixin, before an mmengine ``BaseDataset`` subclass in the bases, that
    generates the shapes data set under ``data_root``
    (:func:`~agent_mm.datasets.shapes.ensure_shapes`) when that folder does
    not exist or is incomplete, then loads the annotations as the dataset
    class does.

    Args:
        generate (dict, optional): Arguments of
            :func:`~agent_mm.datasets.shapes.generate_shapes` (``num_train``,
            ``img_size``, ``seed``...). Defaults to None (its defaults).
        **kwargs: Arguments of the dataset class; ``data_root`` is required.
    """

    def __init__(self,
                 *args,
                 generate: Optional[dict] = None,
                 **kwargs) -> None:
        # set before the base's __init__, which loads the data list
        self._generate_kwargs = dict(generate or {})
        super().__init__(*args, **kwargs)

    def load_data_list(self) -> List[dict]:
        """Generate the data set if needed, then load its annotations."""
        if not self.data_root:
            raise ValueError(f'{type(self).__name__} needs a data_root to '
                             'generate the shapes data set in')
        ensure_shapes(self.data_root, **self._generate_kwargs)
        return super().load_data_list()
