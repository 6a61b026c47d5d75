"""ScaledInitFCNMaskHead: small initial logits on few-class data, and the
deconvolution as a matrix product (PatchConvTranspose2d)."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from mmengine.registry import DefaultScope

from agent_mm.det import PatchConvTranspose2d, ScaledInitFCNMaskHead

SETTINGS = dict(num_convs=2, in_channels=32, conv_out_channels=32,
                num_classes=3)


@pytest.fixture(autouse=True)
def _mmdet_scope():
    """mmdet's scope, where the heads build their losses, whatever scope an
    earlier test in the process left current (a runner's)."""
    with DefaultScope.overwrite_default_scope('mmdet'):
        yield


def _initial_loss(head):
    torch.manual_seed(0)
    head.init_weights()
    head.eval()
    rois = torch.randn(16, 32, 14, 14)
    with torch.no_grad():
        logits = head(rois)
    targets = (torch.rand_like(logits) > 0.5).float()
    return F.binary_cross_entropy_with_logits(logits, targets).item()


def test_initial_mask_loss_is_near_chance():
    head = ScaledInitFCNMaskHead(**SETTINGS)
    assert abs(_initial_loss(head) - math.log(2)) < 0.05
    assert head.conv_logits.weight.std() < 0.02
    assert torch.all(head.conv_logits.bias == 0)


def test_mmdet_head_starts_far_from_chance_with_three_classes():
    """The reason this head exists: mmdet's init gives large logits."""
    assert _initial_loss(FCNMaskHead(**SETTINGS)) > 1.0


def test_registered_in_mmdet():
    from mmdet.registry import MODELS
    head = MODELS.build(dict(type='ScaledInitFCNMaskHead', **SETTINGS))
    assert isinstance(head, FCNMaskHead)


def test_channels_last_gives_the_same_logits_and_gradients():
    # float64: in float32 the two layouts round differently, which can flip
    # a ReLU whose input is within rounding of zero and move a gradient
    torch.manual_seed(0)
    plain = ScaledInitFCNMaskHead(**SETTINGS).double()
    plain.init_weights()
    fast = ScaledInitFCNMaskHead(channels_last=True, **SETTINGS).double()
    fast.load_state_dict(plain.state_dict())
    layouts = []
    fast.convs[0].conv.register_forward_hook(
        lambda m, args, out: layouts.append(
            args[0].is_contiguous(memory_format=torch.channels_last)))
    rois = torch.randn(6, 32, 14, 14, dtype=torch.float64)
    logits = [head(rois) for head in (plain, fast)]
    assert layouts == [True]
    torch.testing.assert_close(logits[1], logits[0])
    weights = torch.randn_like(logits[0])
    for out in logits:
        (out * weights).sum().backward()
    for (name, ours), (_, theirs) in zip(fast.named_parameters(),
                                         plain.named_parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, msg=name)


def _deconv_pair(**kwargs):
    """An nn.ConvTranspose2d and the PatchConvTranspose2d like it."""
    torch.manual_seed(0)
    deconv = torch.nn.ConvTranspose2d(8, 6, **kwargs).double()
    return deconv, PatchConvTranspose2d.like(deconv)


@pytest.mark.parametrize('kernel', [2, 3, (2, 3)])
@pytest.mark.parametrize('channels_last', [False, True])
def test_patch_deconvolution_matches_torch(kernel, channels_last):
    deconv, patch = _deconv_pair(kernel_size=kernel, stride=kernel)
    assert patch.state_dict().keys() == deconv.state_dict().keys()
    x = torch.randn(3, 8, 5, 7, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [layer(x) for layer, x in zip((deconv, patch), inputs)]
    torch.testing.assert_close(outs[1], outs[0])
    assert outs[1].is_contiguous(memory_format=torch.channels_last)
    weights = torch.randn_like(outs[0])
    for out in outs:
        (out * weights).sum().backward()
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad)
    torch.testing.assert_close(patch.weight.grad, deconv.weight.grad)
    torch.testing.assert_close(patch.bias.grad, deconv.bias.grad)


def test_patch_deconvolution_of_no_rois_and_without_bias():
    deconv, patch = _deconv_pair(kernel_size=2, stride=2, bias=False)
    x = torch.randn(0, 8, 14, 14, dtype=torch.float64)
    assert patch(x).shape == deconv(x).shape == (0, 6, 28, 28)
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(patch(x), deconv(x))


def test_patch_deconvolution_in_bfloat16_autocast():
    deconv, patch = _deconv_pair(kernel_size=2, stride=2)
    deconv, patch = deconv.float(), patch.float()
    x = torch.randn(4, 8, 14, 14)
    with torch.autocast('cpu', torch.bfloat16):
        ours, theirs = patch(x), deconv(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2,
                               atol=2e-2)


@pytest.mark.parametrize('settings, wrong', [
    (dict(kernel_size=2, stride=1), 'stride=(1, 1)'),
    (dict(kernel_size=2, stride=2, padding=1), 'padding=(1, 1)'),
    (dict(kernel_size=2, stride=2, groups=2), 'groups=2'),
])
def test_patch_deconvolution_refuses_overlapping_or_padded_kernels(
        settings, wrong):
    with pytest.raises(ValueError, match=re.escape(wrong)):
        PatchConvTranspose2d(8, 6, **settings)


def test_matmul_upsample_keeps_the_heads_parameters_and_logits():
    torch.manual_seed(0)
    plain = ScaledInitFCNMaskHead(channels_last=True, **SETTINGS).double()
    plain.init_weights()
    fast = ScaledInitFCNMaskHead(
        channels_last=True, matmul_upsample=True, **SETTINGS).double()
    assert isinstance(fast.upsample, PatchConvTranspose2d)
    fast.load_state_dict(plain.state_dict())
    assert fast.state_dict().keys() == plain.state_dict().keys()
    rois = torch.randn(5, 32, 14, 14, dtype=torch.float64)
    torch.testing.assert_close(fast(rois), plain(rois))


def test_matmul_upsample_needs_a_deconvolution():
    with pytest.raises(ValueError, match="type 'bilinear'"):
        ScaledInitFCNMaskHead(
            matmul_upsample=True,
            upsample_cfg=dict(type='bilinear', scale_factor=2),
            **SETTINGS)


def test_matmul_upsample_leaves_the_random_stream_as_it_was():
    # the modules built after the head must start as they would without it
    draws = []
    for matmul_upsample in (False, True):
        torch.manual_seed(0)
        head = ScaledInitFCNMaskHead(
            matmul_upsample=matmul_upsample, **SETTINGS)
        draws.append((head.upsample.weight.detach(), torch.rand(4)))
    torch.testing.assert_close(draws[1], draws[0], rtol=0, atol=0)
