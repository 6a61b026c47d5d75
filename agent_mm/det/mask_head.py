"""A Mask R-CNN mask head whose predictor starts with small logits."""
import torch.nn as nn
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from mmdet.registry import MODELS


@MODELS.register_module()
class ScaledInitFCNMaskHead(FCNMaskHead):
    """:class:`FCNMaskHead` with ``conv_logits`` drawn from N(0, std²).

    mmdet initialises the 1×1 predictor with Kaiming (fan-out) init, whose
    std is ``sqrt(2 / num_classes)``: about 0.16 for COCO's 80 classes but
    0.8 for a 3-class data set, where the initial logits reach ±7, the mask
    loss starts near 3 instead of ``ln 2`` and training from scratch
    diverges. This head keeps everything else of :class:`FCNMaskHead`.

    Args:
        logits_init_std: Std of the predictor's initial weights.
        **kwargs: Arguments of :class:`FCNMaskHead`.
    """

    def __init__(self, logits_init_std: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        self.logits_init_std = logits_init_std

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.normal_(self.conv_logits.weight, 0, self.logits_init_std)
        nn.init.zeros_(self.conv_logits.bias)
