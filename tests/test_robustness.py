"""Extreme but valid inputs stay finite; bad inputs fail clearly."""
import os

import pytest
import torch
from mmengine.registry import DefaultScope

from agent_mm.models import AgentPVT, AgentSwinTransformer
from agent_mm.utils import CheckpointError

BACKBONES = {
    'pvt': lambda **kw: AgentPVT(depths=[1, 1, 1, 1], attn_type='AABA', **kw),
    'swin': lambda **kw: AgentSwinTransformer(
        embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
        attn_type='AAMB1', **kw),
}


@pytest.fixture(params=sorted(BACKBONES))
def backbone(request):
    model = BACKBONES[request.param]()
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize('make_input', [
    lambda: torch.zeros(1, 3, 64, 64),
    lambda: torch.full((1, 3, 64, 64), 1e4),
    lambda: torch.randn(1, 3, 64, 64) * 1e5,
    lambda: torch.randn(1, 3, 32, 4000),
    lambda: torch.randn(1, 3, 4000, 32),
], ids=['zeros', 'constant-1e4', 'noise-1e5', 'strip-32x4000',
        'strip-4000x32'])
def test_outputs_stay_finite(backbone, make_input):
    with torch.no_grad():
        outs = backbone(make_input())
    assert len(outs) == 4
    for out in outs:
        assert torch.isfinite(out).all()


def test_unknown_arch_in_a_detector_config_is_a_clear_error():
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = dict(
        type='RetinaNet',
        backbone=dict(type='AgentPVT', arch='xl'),
        neck=dict(type='FPN', in_channels=[64, 128, 320, 512],
                  out_channels=32, num_outs=5),
        bbox_head=dict(type='RetinaHead', num_classes=3, in_channels=32))
    with DefaultScope.overwrite_default_scope('mmdet'):
        with pytest.raises(ValueError,
                           match="Unknown AgentPVT arch 'xl'.*tiny"):
            MODELS.build(cfg)


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_inconsistent_stage_lists_are_a_clear_error(name):
    with pytest.raises(ValueError, match='4 entries'):
        BACKBONES[name](agent_num=[9, 16])


def _init_from(path, name='pvt'):
    model = BACKBONES[name](init_cfg=dict(type='Pretrained',
                                          checkpoint=str(path)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return model, before


def _unchanged(model, before):
    return all(torch.equal(v, before[k])
               for k, v in model.state_dict().items())


def test_truncated_checkpoint_leaves_the_model_untouched(tmp_path):
    path = tmp_path / 'agent_pvt_t_max_acc.pth'
    torch.save({'model': BACKBONES['pvt']().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:4096])
    model, before = _init_from(path)
    with pytest.raises(CheckpointError, match='truncated'):
        model.init_weights()
    assert _unchanged(model, before)


class _Payload:

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker, )


def test_checkpoint_with_pickled_callable_is_refused_not_run(tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pth'
    state = BACKBONES['swin']().state_dict()
    torch.save({'state_dict': state, 'x': _Payload(str(marker))}, path)
    model, before = _init_from(path, 'swin')
    with pytest.raises(CheckpointError, match='Refused'):
        model.init_weights()
    assert not marker.exists()
    assert _unchanged(model, before)


def test_wrong_model_checkpoint_leaves_the_model_untouched(tmp_path):
    path = tmp_path / 'other.pth'
    wider = AgentPVT(depths=[1, 1, 1, 1], attn_type='AABA',
                     embed_dims=[32, 64, 160, 256])
    torch.save({'state_dict': wider.state_dict()}, path)
    model, before = _init_from(path)
    with pytest.raises(ValueError, match='Shape mismatches'):
        model.init_weights()
    assert _unchanged(model, before)
