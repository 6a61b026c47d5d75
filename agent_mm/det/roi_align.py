"""mmcv's ``RoIAlign`` computed as a sparse matrix product in training on
the CPU.

mmcv's CPU RoIAlign runs in one thread, one scalar at a time, and its
backward pass scatters every sample of every bin into the feature map: in
a small Mask R-CNN trained on the CPU the two take a fifth of the training
step. Average RoIAlign is linear in the features, ``out = S @ features``
with ``S`` a sparse matrix of bilinear weights (at most four per sample,
divided by the bin's sample count), so its gradient is ``Sᵀ @ grad_out``.
:class:`SparseRoIAlign` builds ``S`` from the RoIs with tensor operations,
following mmcv's sampling rules exactly, and runs both passes as sparse
matrix products. Calls without gradients (validation, test) still run
mmcv's kernel, so test results are unchanged.
"""
import warnings
from typing import Tuple

import mmcv.ops
import torch
from mmcv.ops import RoIAlign
from torch import Tensor
from torch.autograd import Function


def _axis_taps(start: Tensor, length: Tensor, bins: int, grid: Tensor,
               size: int) -> Tuple[Tensor, Tensor]:
    """The bilinear taps along one axis of every sample, as mmcv's
    ``bilinear_interpolate`` computes them.

    Args:
        start: ``(K,)`` first coordinate of each RoI in feature pixels.
        length: ``(K,)`` extent of each RoI.
        bins: Output bins along the axis.
        grid: ``(K,)`` samples per bin along the axis (0 for none).
        size: Feature map extent along the axis.

    Returns:
        Indices and weights, both ``(K, bins, G, 2)`` with ``G`` the largest
        grid; weights are 0 for padding samples and samples outside the
        map.
    """
    steps = max(int(grid.max()), 1) if grid.numel() else 1
    bin_size = (length / bins)[:, None, None]
    samples = torch.arange(steps, dtype=start.dtype, device=start.device)
    coords = (start[:, None, None] +
              torch.arange(bins, dtype=start.dtype,
                           device=start.device)[None, :, None] * bin_size +
              (samples + .5) * bin_size / grid.clamp(min=1)[:, None, None])
    valid = (samples < grid[:, None, None]) & (coords >= -1.) & (coords <=
                                                                 size)
    coords = coords.clamp(min=0.)
    low = coords.long()
    last = low >= size - 1
    low = torch.where(last, size - 1, low)
    high = torch.where(last, low, low + 1)
    frac = torch.where(last, 0., coords - low.to(coords.dtype))
    weights = torch.stack([1. - frac, frac], -1) * valid.unsqueeze(-1)
    return torch.stack([low, high], -1), weights


def sampling_matrix(rois: Tensor, feature_shape: Tuple[int, int, int],
                    output_size: Tuple[int, int], spatial_scale: float,
                    sampling_ratio: int, aligned: bool) -> Tensor:
    """``S`` of RoIAlign's ``out = S @ features``, sparse CSR.

    Args:
        rois: ``(K, 5)`` boxes ``(batch_index, x1, y1, x2, y2)``.
        feature_shape: ``(B, H, W)`` of the feature map.
        output_size: ``(out_h, out_w)`` bins.
        spatial_scale: Scale of the boxes to feature pixels.
        sampling_ratio: Samples per bin and axis; 0 for
            ``ceil(roi_size / bins)`` per RoI.
        aligned: Shift the boxes by half a pixel (mmcv's ``aligned``).

    Returns:
        ``(K*out_h*out_w, B*H*W)``: a row per output bin (RoI-major, then
        bin row, then bin column), a column per feature pixel. Built in row
        order, so no sorting is needed.
    """
    batch, height, width = feature_shape
    out_h, out_w = output_size
    offset = .5 if aligned else 0.
    boxes = rois[:, 1:].float() * spatial_scale - offset
    size_x, size_y = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if not aligned:
        size_x, size_y = size_x.clamp(min=1.), size_y.clamp(min=1.)
    if sampling_ratio > 0:
        grid_y = torch.full_like(size_y, sampling_ratio, dtype=torch.long)
        grid_x = torch.full_like(size_x, sampling_ratio, dtype=torch.long)
    else:
        grid_y = torch.ceil(size_y / out_h).long().clamp(min=0)
        grid_x = torch.ceil(size_x / out_w).long().clamp(min=0)
    count = (grid_y * grid_x).clamp(min=1).to(boxes.dtype)
    index_y, weight_y = _axis_taps(boxes[:, 1], size_y, out_h, grid_y, height)
    index_x, weight_x = _axis_taps(boxes[:, 0], size_x, out_w, grid_x, width)
    # (K, out_h, out_w, G_y, G_x, 2, 2): every tap of every sample of every
    # bin
    shape = (-1, out_h, 1, index_y.shape[2], 1, 2, 1)
    shape_x = (-1, 1, out_w, 1, index_x.shape[2], 1, 2)
    image = rois[:, 0].long().view(-1, 1, 1, 1, 1, 1, 1)
    pixel = (image * height + index_y.view(shape)) * width + index_x.view(
        shape_x)
    weight = (weight_y.view(shape) * weight_x.view(shape_x) /
              count.view(-1, 1, 1, 1, 1, 1, 1))
    bins = torch.arange(
        rois.shape[0] * out_h * out_w, device=rois.device).view(
            -1, out_h, out_w, 1, 1, 1, 1)
    pixel, bins, weight = torch.broadcast_tensors(pixel, bins, weight)
    keep = weight.flatten() != 0
    bins = bins.flatten()[keep]
    rows = rois.shape[0] * out_h * out_w
    crow = torch.zeros(rows + 1, dtype=torch.long, device=rois.device)
    crow[1:] = torch.bincount(bins, minlength=rows).cumsum(0)
    # valid by construction (rows in order, columns in range); a row's
    # columns may repeat a pixel, which the products sum, so PyTorch's
    # invariant check (sorted, unique columns) is off, said explicitly so
    # that it does not warn at every call
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', 'Sparse CSR tensor support')
        return torch.sparse_csr_tensor(
            crow,
            pixel.flatten()[keep],
            weight.flatten()[keep], (rows, batch * height * width),
            check_invariants=False)


class _SparseRoIAlign(Function):
    """Average RoIAlign as ``S @ features`` and ``Sᵀ @ grad_out``
    (:func:`sampling_matrix`), on ``(pixels, C)`` rows."""

    @staticmethod
    def forward(ctx, features: Tensor, rois: Tensor,
                output_size: Tuple[int, int], spatial_scale: float,
                sampling_ratio: int, aligned: bool) -> Tensor:
        batch, channels, height, width = features.shape
        matrix = sampling_matrix(rois, (batch, height, width), output_size,
                                 spatial_scale, sampling_ratio,
                                 aligned).to(features.dtype)
        rows = features.permute(0, 2, 3, 1).reshape(-1, channels)
        out = torch.mm(matrix, rows).view(-1, *output_size, channels)
        ctx.matrix = matrix
        ctx.feature_shape = features.shape
        return out.permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple:
        batch, channels, height, width = ctx.feature_shape
        grad_rows = grad_out.permute(0, 2, 3, 1).reshape(-1, channels)
        grad = torch.mm(ctx.matrix.t(), grad_rows)
        grad = grad.view(batch, height, width, channels).permute(0, 3, 1, 2)
        return grad, None, None, None, None, None


class SparseRoIAlign(RoIAlign):
    """``mmcv.ops.RoIAlign`` (same arguments; outputs equal up to float
    rounding) computed by :func:`sampling_matrix` products when it trains on
    the CPU, several times faster than mmcv's kernels forward and backward.

    Use it in an mmdet config as ``roi_layer=dict(type='SparseRoIAlign',
    ...)`` once ``agent_mm.det`` is imported (mmdet's RoI extractors look
    their layer up in ``mmcv.ops``). Max pooling, torchvision's kernel, GPU
    tensors and calls without gradients run mmcv's RoIAlign, given NCHW
    features: channels-last ones (a backbone's ``channels_last_outputs``
    through an FPN), which mmcv's kernels would read as NCHW, are copied.
    """

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        if (self.pool_mode != 'avg' or self.use_torchvision
                or input.device.type != 'cpu' or not torch.is_grad_enabled()
                or not input.requires_grad):
            return super().forward(input.contiguous(), rois)
        # PyTorch's sparse products have no 16-bit CPU kernels: under
        # autocast (``--amp``) the product runs in float32, and the output
        # is given in the input's dtype, as mmcv's kernel gives it
        with torch.autocast('cpu', enabled=False):
            out = _SparseRoIAlign.apply(input.float(), rois.float(),
                                        self.output_size, self.spatial_scale,
                                        self.sampling_ratio, self.aligned)
        return out.to(input.dtype)


# mmdet's RoI extractors build their layer as getattr(mmcv.ops, type)
mmcv.ops.SparseRoIAlign = SparseRoIAlign
