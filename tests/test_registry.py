"""The backbones are found by name from mmdet's and mmseg's registries."""
import subprocess
import sys

import pytest
import torch
from mmengine.registry import DefaultScope

import agent_mm  # noqa: F401


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
@pytest.mark.parametrize('backbone', [
    dict(type='AgentPVT', arch='tiny', depths=[1, 1, 1, 1]),
    dict(type='AgentSwinTransformer', arch='tiny', depths=[1, 1, 1, 1]),
])
def test_build_from_codebase_registry(scope, backbone):
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(dict(backbone))
    assert type(model).__name__ == backbone['type']
    with torch.no_grad():
        outs = model.eval()(torch.randn(1, 3, 64, 64))
    assert len(outs) == 4


def test_mmdet_detector_with_agent_backbone_runs():
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    detector = MODELS.build(
        dict(
            type='RetinaNet',
            data_preprocessor=dict(type='DetDataPreprocessor'),
            backbone=dict(type='AgentPVT', depths=[1, 1, 1, 1]),
            neck=dict(
                type='FPN',
                in_channels=[64, 128, 320, 512],
                out_channels=32,
                start_level=1,
                add_extra_convs='on_input',
                num_outs=5),
            bbox_head=dict(
                type='RetinaHead',
                num_classes=3,
                in_channels=32,
                feat_channels=32,
                stacked_convs=1,
                anchor_generator=dict(
                    type='AnchorGenerator',
                    octave_base_scale=4,
                    scales_per_octave=3,
                    ratios=[0.5, 1.0, 2.0],
                    strides=[8, 16, 32, 64, 128]),
                bbox_coder=dict(type='DeltaXYWHBBoxCoder'),
                loss_cls=dict(type='FocalLoss', use_sigmoid=True),
                loss_bbox=dict(type='L1Loss'))))
    # tensor mode: backbone, neck and head, raw head outputs per level
    cls_scores, bbox_preds = detector(
        torch.randn(1, 3, 96, 128), mode='tensor')
    strides = [8, 16, 32, 64, 128]
    assert [tuple(s.shape) for s in cls_scores] == [
        (1, 9 * 3, -(-96 // s), -(-128 // s)) for s in strides]
    assert [s.shape[1] for s in bbox_preds] == [9 * 4] * 5


def test_import_is_light():
    """Importing agent_mm must not pull in mmdet, mmseg or mmcv."""
    code = ('import sys, agent_mm; '
            'print(sorted(m for m in ("mmdet", "mmseg", "mmcv") '
            'if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == '[]'
