"""SparseRoIAlign: mmcv's RoIAlign values and gradients from sparse matrix
products in CPU training, mmcv's own kernel elsewhere."""
import pytest
import torch
from mmcv.ops import RoIAlign

from agent_mm.det.roi_align import SparseRoIAlign, sampling_matrix


def _inputs(num_rois=40, batch=3, channels=5, height=11, width=9):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(
        batch, channels, height, width, generator=gen, requires_grad=True)
    # boxes in image pixels (stride 8), some beyond the borders; the last
    # one empty, which mmcv pools to zero
    corner = torch.rand(num_rois, 2, generator=gen) * 100 - 12
    size = torch.rand(num_rois, 2, generator=gen) * 60
    boxes = torch.cat([corner, corner + size], 1)
    boxes[-1, 2:] = boxes[-1, :2]
    index = torch.randint(0, batch, (num_rois, 1), generator=gen).float()
    return features, torch.cat([index, boxes], 1)


SETTINGS = [
    dict(output_size=7, spatial_scale=1 / 8, sampling_ratio=0),
    dict(output_size=(14, 14), spatial_scale=1 / 8, sampling_ratio=0),
    dict(output_size=(3, 5), spatial_scale=1 / 8, sampling_ratio=2),
    dict(output_size=7, spatial_scale=1 / 8, sampling_ratio=0,
         aligned=False),
]


@pytest.mark.parametrize('settings', SETTINGS)
def test_training_values_and_gradients_are_mmcvs(settings):
    features, rois = _inputs()
    ours, theirs = SparseRoIAlign(**settings), RoIAlign(**settings)
    out = ours(features, rois)
    expected = theirs(features, rois)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    got, = torch.autograd.grad(out, features, grad)
    want, = torch.autograd.grad(expected, features, grad)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_trains_under_bfloat16_autocast_as_mmcvs_kernel(dtype):
    features, rois = _inputs()
    inputs = features.detach().to(dtype).requires_grad_()
    settings = SETTINGS[0]
    with torch.autocast('cpu', torch.bfloat16):
        out = SparseRoIAlign(**settings)(inputs, rois)
    assert out.dtype == dtype
    expected = RoIAlign(**settings)(features, rois)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        out.float(), expected, atol=tolerance, rtol=tolerance)
    grad = torch.randn_like(expected)
    got, = torch.autograd.grad(out, inputs, grad.to(dtype))
    want, = torch.autograd.grad(expected, features, grad)
    assert got.dtype == dtype
    torch.testing.assert_close(
        got.float(), want, atol=tolerance, rtol=tolerance)


def test_sampling_matrix_reproduces_the_forward():
    features, rois = _inputs()
    settings = SETTINGS[0]
    matrix = sampling_matrix(rois, (3, 11, 9), (7, 7),
                             settings['spatial_scale'], 0, True)
    assert matrix.shape == (40 * 49, 3 * 11 * 9)
    rows = features.detach().permute(0, 2, 3, 1).reshape(-1, 5)
    out = (matrix @ rows).view(40, 7, 7, 5).permute(0, 3, 1, 2)
    expected = RoIAlign(**settings)(features.detach(), rois)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the empty box reads nothing
    assert torch.count_nonzero(matrix.to_dense()[-49:]) == 0


def test_without_gradients_mmcvs_kernel_runs(monkeypatch):
    features, rois = _inputs()
    layer = SparseRoIAlign(**SETTINGS[0])
    monkeypatch.setattr(
        sampling_matrix.__module__ + '.sampling_matrix',
        lambda *args: pytest.fail('sparse path taken without gradients'))
    with torch.no_grad():
        out = layer(features, rois)
    assert torch.equal(out, RoIAlign(**SETTINGS[0])(features.detach(), rois))


def test_max_pooling_is_mmcvs():
    features, rois = _inputs()
    settings = dict(SETTINGS[0], pool_mode='max')
    out = SparseRoIAlign(**settings)(features, rois)
    assert torch.equal(out, RoIAlign(**settings)(features, rois))


def test_mmdet_roi_extractor_builds_it_by_name():
    from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

    import agent_mm.det  # noqa: F401 (registers SparseRoIAlign in mmcv.ops)
    extractor = SingleRoIExtractor(
        roi_layer=dict(type='SparseRoIAlign', output_size=7,
                       sampling_ratio=0),
        out_channels=5,
        featmap_strides=[8, 16])
    assert all(isinstance(layer, SparseRoIAlign)
               for layer in extractor.roi_layers)


@pytest.mark.parametrize('grad', [True, False])
def test_channels_last_features_give_the_nchw_result(grad):
    # mmcv's kernels read channels-last memory as if it were NCHW; the
    # sparse path reads any layout, the fallback is given an NCHW copy
    features, rois = _inputs()
    layer = SparseRoIAlign(**SETTINGS[0])
    channels_last = features.detach().to(
        memory_format=torch.channels_last).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = layer(channels_last, rois)
        expected = RoIAlign(**SETTINGS[0])(features.detach(), rois)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
