"""The authors' mmdet 2.x / mmseg 0.x checkpoints load into our configs.

Their weight names are those of mmdet 3.x / mmseg 1.x (backbones included),
so no conversion is needed: this builds a checkpoint in the 2.x layout (with
the 2.x metadata) from our own models and loads it strictly, as
``tools/test.py`` (and ``mim test``) do.
"""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import load_checkpoint

import agent_mm  # noqa: F401

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

CASES = [
    ('configs/agent_pvt/mask-rcnn_agent-pvt-t_fpn_1x_coco.py', 'mmdet',
     dict(mmdet_version='2.25.1', CLASSES=('person', 'bicycle'))),
    ('configs/agent_swin/upernet_agent-swin-t_8xb2-160k_ade20k-512x512.py',
     'mmseg', dict(mmseg_version='0.30.0', CLASSES=('wall', 'building'),
                   PALETTE=[[120, 120, 120], [180, 120, 120]])),
]


def _build(config, scope):
    cfg = Config.fromfile(osp.join(REPO, config))
    cfg.model.backbone.init_cfg = None
    cfg.model.pop('pretrained', None)
    init_default_scope(scope)
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return MODELS.build(cfg.model), cfg


@pytest.mark.parametrize('config, scope, meta', CASES)
def test_released_downstream_layout_loads_strictly(tmp_path, config, scope,
                                                   meta):
    source, cfg = _build(config, scope)
    with torch.no_grad():
        for param in source.parameters():
            param.normal_()
    path = tmp_path / 'released.pth'
    torch.save(
        {
            'meta': dict(meta, config=cfg.pretty_text, epoch=12,
                         iter=87948, hook_msgs={'last_ckpt': 'x.pth'}),
            'state_dict': source.state_dict(),
            'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-4}]},
        }, path)

    model, _ = _build(config, scope)
    load_checkpoint(model, str(path), map_location='cpu', strict=True)

    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    backbone_keys = [k for k in source.state_dict() if k.startswith(
        'backbone.')]
    assert any('.attn.an_bias' in k for k in backbone_keys)
