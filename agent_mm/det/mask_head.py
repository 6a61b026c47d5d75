"""A Mask R-CNN mask head for few classes and CPU training."""
import torch
import torch.nn as nn
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from mmdet.registry import MODELS


@MODELS.register_module()
class ScaledInitFCNMaskHead(FCNMaskHead):
    """:class:`FCNMaskHead` with ``conv_logits`` drawn from N(0, std²), and
    optionally its convolutions in channels-last memory format.

    mmdet initialises the 1×1 predictor with Kaiming (fan-out) init, whose
    std is ``sqrt(2 / num_classes)``: about 0.16 for COCO's 80 classes but
    0.8 for a 3-class data set, where the initial logits reach ±7, the mask
    loss starts near 3 instead of ``ln 2`` and training from scratch
    diverges. This head keeps everything else of :class:`FCNMaskHead`.

    Args:
        logits_init_std: Std of the predictor's initial weights.
        channels_last: Lay the RoI features out channels-last before the
            convolutions: oneDNN's own layout on the CPU, where it spares a
            reorder per convolution and direction (and tensor cores' under
            CUDA half precision). The logits are the same up to rounding.
        **kwargs: Arguments of :class:`FCNMaskHead`.
    """

    def __init__(self,
                 logits_init_std: float = 0.01,
                 channels_last: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.logits_init_std = logits_init_std
        self.channels_last = channels_last

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.normal_(self.conv_logits.weight, 0, self.logits_init_std)
        nn.init.zeros_(self.conv_logits.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mask logits of the RoI features ``x`` (N, C, H, W)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)
