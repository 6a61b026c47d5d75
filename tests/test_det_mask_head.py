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
