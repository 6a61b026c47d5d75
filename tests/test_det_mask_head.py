"""ScaledInitFCNMaskHead: small initial logits on few-class data."""
import math

import torch
import torch.nn.functional as F
from mmdet.models.roi_heads.mask_heads import FCNMaskHead

from agent_mm.det import ScaledInitFCNMaskHead

SETTINGS = dict(num_convs=2, in_channels=32, conv_out_channels=32,
                num_classes=3)


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
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmdet'):
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
