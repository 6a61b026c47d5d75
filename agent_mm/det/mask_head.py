"""A Mask R-CNN mask head for few classes and CPU training."""
from typing import Any, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from mmdet.registry import MODELS


class PatchConvTranspose2d(nn.ConvTranspose2d):
    """A transposed convolution whose kernel equals its stride, computed as
    one matrix product over the pixels in channels-last layout.

    With kernel = stride (and no padding), each input pixel writes its own
    ``k_h×k_w`` patch of the output: ``out_channels·k_h·k_w`` values that
    are a linear map of its channels. The product gives those values per
    pixel and one layout copy puts the patches in place. oneDNN's CPU
    transposed convolution is several times slower at the Mask R-CNN mask
    head's 2×2 upsampling, backward above all (bfloat16, 42 RoIs of 128
    channels, 14² → 28²: forward and backward in 0.32 of the time).

    The parameters (and state-dict keys) are those of
    :class:`torch.nn.ConvTranspose2d`; the results are the same up to
    rounding. The output is channels-last.

    Raises:
        ValueError: If the kernel differs from the stride, or padding,
            output padding, dilation or groups are set.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plain = dict(
            padding=(0, 0),
            output_padding=(0, 0),
            dilation=(1, 1),
            groups=1,
            stride=self.kernel_size)
        wrong = [
            name for name, value in plain.items()
            if getattr(self, name) != value
        ]
        if wrong:
            raise ValueError(
                'PatchConvTranspose2d computes a transposed convolution '
                'whose kernel equals its stride, without padding, output '
                'padding, dilation or groups; got ' +
                ', '.join(f'{name}={getattr(self, name)}' for name in wrong) +
                f' (kernel_size={self.kernel_size}): use '
                'torch.nn.ConvTranspose2d for it')

    @classmethod
    def like(cls, deconv: nn.ConvTranspose2d) -> 'PatchConvTranspose2d':
        """A new layer of ``deconv``'s configuration, with its parameters
        (made on the meta device, so that no initialisation draws from the
        random stream: the modules built after it start as they would with
        ``deconv``)."""
        layer = cls(
            deconv.in_channels,
            deconv.out_channels,
            deconv.kernel_size,
            stride=deconv.stride,
            padding=deconv.padding,
            output_padding=deconv.output_padding,
            groups=deconv.groups,
            bias=deconv.bias is not None,
            dilation=deconv.dilation,
            device='meta',
            dtype=deconv.weight.dtype).to_empty(device=deconv.weight.device)
        layer.load_state_dict(deconv.state_dict())
        return layer

    def forward(self,
                x: torch.Tensor,
                output_size: Optional[List[int]] = None) -> torch.Tensor:
        """Upsample ``x`` (N, C, H, W) to (N, out, H·k_h, W·k_w)."""
        if output_size is not None:
            return super().forward(x, output_size)
        batch, _, height, width = x.shape
        kernel_h, kernel_w = self.kernel_size
        # (in, out, k_h, k_w) -> rows ordered (k_h, k_w, out)
        weight = self.weight.permute(2, 3, 1, 0).flatten(0, 2)
        bias = None if self.bias is None else self.bias.repeat(kernel_h *
                                                               kernel_w)
        patches = F.linear(x.permute(0, 2, 3, 1), weight, bias)
        patches = patches.view(batch, height, width, kernel_h, kernel_w,
                               self.out_channels)
        pixels = patches.permute(0, 1, 3, 2, 4, 5).reshape(
            batch, height * kernel_h, width * kernel_w, self.out_channels)
        return pixels.permute(0, 3, 1, 2)


@MODELS.register_module()
class ScaledInitFCNMaskHead(FCNMaskHead):
    """:class:`FCNMaskHead` with ``conv_logits`` drawn from N(0, std²), and
    optionally its convolutions in channels-last memory format and its
    deconvolution as a matrix product.

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
        matmul_upsample: Compute the ``'deconv'`` upsampling (kernel =
            stride) as one matrix product (:class:`PatchConvTranspose2d`):
            the same parameters, the logits the same up to rounding.
        **kwargs: Arguments of :class:`FCNMaskHead`.

    Raises:
        ValueError: If ``matmul_upsample`` is set with another upsampling
            than ``'deconv'``.
    """

    def __init__(self,
                 logits_init_std: float = 0.01,
                 channels_last: bool = False,
                 matmul_upsample: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.logits_init_std = logits_init_std
        self.channels_last = channels_last
        if matmul_upsample:
            if self.upsample_method != 'deconv':
                raise ValueError(
                    'matmul_upsample computes a deconvolution: it needs '
                    "upsample_cfg=dict(type='deconv', ...), got type "
                    f'{self.upsample_method!r}')
            self.upsample = PatchConvTranspose2d.like(self.upsample)

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.normal_(self.conv_logits.weight, 0, self.logits_init_std)
        nn.init.zeros_(self.conv_logits.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mask logits of the RoI features ``x`` (N, C, H, W)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)
