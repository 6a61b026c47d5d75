"""Checkpoints of another model or arch are refused: through init_cfg,
tools/test.py (load_from) and tools/train.py --resume."""
import os.path as osp
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from tiny_configs import DET_CONFIG, DET_OVERRIDES, REPO, tiny_config

import agent_mm  # noqa: F401  (registers the backbones and the hook)
from agent_mm.engine.checkpoint_match import (TOLERATED_KEYS, key_mismatch,
                                              mismatch_message)
from agent_mm.models import AgentPVT

sys.path.insert(0, osp.join(REPO, 'tools'))
import test as test_tool  # noqa: E402
import train as train_tool  # noqa: E402

PVT_S_DEPTHS = [3, 4, 6, 3]


@pytest.fixture
def tiny_det(tmp_path):
    return tiny_config(tmp_path, DET_CONFIG, DET_OVERRIDES,
                       data='dict(num_train=2, num_val=2, img_size=64, '
                       'seed=3)')


def _detector_checkpoint(config, path, **backbone):
    """Save a detector of ``config`` (backbone settings overridden)."""
    cfg = Config.fromfile(config)
    cfg.model.backbone.update(backbone)
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    model = MODELS.build(cfg.model)
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, str(path))
    return model


def test_pvt_s_backbone_weights_for_pvt_t_are_an_error(tmp_path):
    path = tmp_path / 'agent_pvt_s.pth'
    torch.save({'model': AgentPVT(arch='small').state_dict()}, str(path))
    model = AgentPVT(
        arch='tiny', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        model.init_weights()
    message = str(info.value)
    assert 'another architecture' in message
    assert 'block1.2.attn.q.weight' in message
    # PVT-S has 1 + 2 + 4 + 1 more blocks of the same shapes
    per_block = sum(1 for k in before if k.startswith('block1.0.'))
    assert f'has {8 * per_block} weights that AgentPVT does not have' in (
        message)
    assert all(torch.equal(v, before[k])
               for k, v in model.state_dict().items())


def test_known_extras_of_released_checkpoints_are_skipped(tmp_path):
    source = AgentPVT(depths=[1, 1, 1, 1])
    saved = dict(source.state_dict())
    saved.update({'head.weight': torch.zeros(1000, 512),
                  'head.bias': torch.zeros(1000),
                  'norm.weight': torch.ones(512),
                  'norm.bias': torch.zeros(512)})
    path = tmp_path / 'imagenet.pth'
    torch.save({'model': saved}, str(path))
    model = AgentPVT(depths=[1, 1, 1, 1],
                     init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_pvt_s_detector_checkpoint_for_pvt_t_config_is_an_error(
        tiny_det, tmp_path):
    ckpt = tmp_path / 'mask-rcnn_agent-pvt-s.pth'
    _detector_checkpoint(tiny_det, ckpt, depths=PVT_S_DEPTHS)
    with pytest.raises(ValueError) as info:
        test_tool.main([tiny_det, str(ckpt), '--work-dir',
                        str(tmp_path / 'work')])
    message = str(info.value)
    assert 'does not match the model' in message
    assert 'weights are not in the model: backbone.block1.2.' in message
    assert '--partial-load' in message


# the flag also reaches a match hook the config declares itself
@pytest.mark.parametrize('own_hook', [False, True])
def test_partial_load_flag_allows_a_deliberate_partial_load(
        tiny_det, tmp_path, own_hook):
    ckpt = tmp_path / 'mask-rcnn_agent-pvt-s.pth'
    _detector_checkpoint(tiny_det, ckpt, depths=PVT_S_DEPTHS)
    if own_hook:
        with open(tiny_det, 'a') as f:
            f.write("custom_hooks = [dict(type='CheckpointMatchHook')]\n")
    metrics = test_tool.main([
        tiny_det, str(ckpt), '--work-dir',
        str(tmp_path / 'work'), '--partial-load'
    ])
    assert 'coco/bbox_mAP' in metrics


def test_imagenet_backbone_file_given_to_the_test_tool_is_an_error(
        tiny_det, tmp_path):
    ckpt = tmp_path / 'agent_pvt_t_max_acc.pth'
    torch.save({'model': AgentPVT(arch='tiny').state_dict(), 'epoch': 299},
               str(ckpt))
    with pytest.raises(ValueError, match='ImageNet classification'):
        test_tool.main([tiny_det, str(ckpt), '--work-dir',
                        str(tmp_path / 'work')])


def test_resume_from_a_checkpoint_of_another_arch_is_an_error(
        tiny_det, tmp_path):
    ckpt = tmp_path / 'epoch_1.pth'
    _detector_checkpoint(tiny_det, ckpt, depths=PVT_S_DEPTHS)
    with pytest.raises(ValueError, match='does not match the model'):
        train_tool.main([tiny_det, '--resume', str(ckpt), '--work-dir',
                         str(tmp_path / 'work')])


def test_key_mismatch_ignores_only_the_tolerated_keys():
    model = ['a.weight', 'bn.num_batches_tracked', 'blk.attn_mask', 'b.w']
    checkpoint = ['a.weight', 'c.weight', 'x.relative_position_index']
    missing, unexpected = key_mismatch(model, checkpoint)
    assert missing == ['b.w']
    assert unexpected == ['c.weight']
    assert len(TOLERATED_KEYS) == 3


def test_mismatch_message_counts_and_lists_keys():
    model = [f'm{i}' for i in range(15)] + ['shared']
    message = mismatch_message(model, ['shared', 'extra'], 'Checkpoint x')
    assert message.startswith('Checkpoint x does not match the model: ')
    assert "15 of the model's 16 weights are missing" in message
    assert '(and 5 more)' in message
    assert '1 weights are not in the model: extra' in message
    assert mismatch_message(['a'], ['a'], 'x') is None
