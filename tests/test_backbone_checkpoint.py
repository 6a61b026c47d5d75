"""Loading the authors' released checkpoint layouts into the backbones."""
import re

import pytest
import torch
from backbone_checks import downstream_layout, random_weights

import agent_mm.models.checkpoint as checkpoint_module
from agent_mm.models import (AgentPVT, AgentSwinTransformer,
                             extract_backbone_state_dict)

SMALL_PVT = dict(depths=[1, 1, 1, 1], attn_type='AAAB')
SMALL_SWIN = dict(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
                  attn_type='AAMB1')


def _source(build):
    return random_weights(build())


def _imagenet_layout(state_dict, yacs_cfgnode, num_features):
    model = dict(state_dict)
    model.update({
        'norm.weight': torch.ones(num_features),
        'norm.bias': torch.zeros(num_features),
        'head.weight': torch.zeros(1000, num_features),
        'head.bias': torch.zeros(1000),
    })
    return {
        'model': model,
        'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-3}]},
        'lr_scheduler': {'last_epoch': 299},
        'max_accuracy': 79.4,
        'epoch': 299,
        'config': yacs_cfgnode(MODEL=yacs_cfgnode(NAME='agent')),
    }


CASES = [
    (lambda: AgentPVT(**SMALL_PVT), 512),
    (lambda: AgentSwinTransformer(**SMALL_SWIN), 128),
]


@pytest.mark.parametrize('build, num_features', CASES)
@pytest.mark.parametrize('layout', ['imagenet', 'downstream'])
def test_released_layouts_load_every_backbone_key(tmp_path, yacs_cfgnode,
                                                  log_messages, build,
                                                  num_features, layout):
    source = _source(build)
    state_dict = source.state_dict()
    if layout == 'imagenet':
        saved = _imagenet_layout(state_dict, yacs_cfgnode, num_features)
    else:
        saved = downstream_layout(state_dict)
    path = str(tmp_path / f'{layout}.pth')
    with yacs_cfgnode.importable():
        torch.save(saved, path)

    model = build()
    model.init_cfg = dict(type='Pretrained', checkpoint=path)
    model.init_weights()

    for key, value in state_dict.items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    assert not any('not in the checkpoint' in m for m in log_messages)
    unused = [m for m in log_messages if 'not used by the backbone' in m]
    if layout == 'imagenet':
        assert len(unused) == 1 and 'head.weight' in unused[0]
    else:
        assert not unused  # only backbone.* keys are considered


def test_missing_keys_are_reported_through_the_logger(tmp_path,
                                                      log_messages):
    state_dict = AgentPVT(**SMALL_PVT).state_dict()
    del state_dict['pos_embed1']
    path = str(tmp_path / 'partial.pth')
    torch.save({'state_dict': state_dict}, path)
    model = AgentPVT(
        **SMALL_PVT, init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    missing = [m for m in log_messages if 'not in the checkpoint' in m]
    assert len(missing) == 1 and 'pos_embed1' in missing[0]


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    state_dict = AgentSwinTransformer(**dict(SMALL_SWIN,
                                             embed_dims=32)).state_dict()
    path = str(tmp_path / 'wider.pth')
    torch.save({'model': state_dict}, path)
    model = AgentSwinTransformer(**SMALL_SWIN, init_cfg=dict(
        type='Pretrained', checkpoint=path))
    with pytest.raises(ValueError) as info:
        model.init_weights()
    message = str(info.value)
    assert 'patch_embed.proj.weight: checkpoint (32, 3, 4, 4) vs model ' \
           '(16, 3, 4, 4)' in message
    assert 'wider.pth' in message


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    resnet_like = {'conv1.weight': torch.zeros(64, 3, 7, 7),
                   'bn1.weight': torch.ones(64),
                   'layer1.0.conv1.weight': torch.zeros(64, 64, 1, 1)}
    path = str(tmp_path / 'resnet50.pth')
    torch.save({'state_dict': resnet_like}, path)
    model = AgentPVT(
        **SMALL_PVT, init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(ValueError, match='another model'):
        model.init_weights()


def test_missing_checkpoint_file_names_the_path(tmp_path):
    path = str(tmp_path / 'agent_pvt_t_max_acc.pth')
    model = AgentPVT(
        **SMALL_PVT, init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(FileNotFoundError, match='agent_pvt_t_max_acc.pth'):
        model.init_weights()


def test_extract_strips_prefixes_and_keeps_backbone_only():
    weights = {'module.backbone.a': torch.zeros(1),
               'module.neck.b': torch.zeros(1)}
    assert list(extract_backbone_state_dict({'state_dict': weights})) == ['a']
    with pytest.raises(ValueError, match='no tensors'):
        extract_backbone_state_dict({'meta': {'epoch': 1}})


def _plain_pvt_layout(state_dict):
    """A plain PVT v1 ImageNet state dict: spatial reduction in every
    stage with sr_ratio > 1, a class token in stage 4, no agent weights."""
    plain = {k: v for k, v in state_dict.items()
             if not re.fullmatch(checkpoint_module.AGENT_ONLY_KEYS, k)}
    for stage, (dims, sr_ratio) in enumerate(zip([64, 128, 320, 512],
                                                 [8, 4, 2, 1])):
        if sr_ratio > 1:
            plain[f'block{stage + 1}.0.attn.sr.weight'] = torch.randn(
                dims, dims, sr_ratio, sr_ratio)
            plain[f'block{stage + 1}.0.attn.sr.bias'] = torch.randn(dims)
            plain[f'block{stage + 1}.0.attn.norm.weight'] = torch.randn(dims)
            plain[f'block{stage + 1}.0.attn.norm.bias'] = torch.randn(dims)
    plain['cls_token'] = torch.randn(1, 1, 512)
    plain['pos_embed4'] = torch.cat(
        [plain['cls_token'], state_dict['pos_embed4']], dim=1)
    plain.update({'norm.weight': torch.ones(512), 'norm.bias': torch.zeros(
        512), 'head.weight': torch.zeros(1000, 512),
        'head.bias': torch.zeros(1000)})
    return plain


def _plain_swin_layout(model, state_dict):
    """An original Swin ImageNet state dict: window attention (position
    bias table and index) in every block, shift masks, one final norm."""
    plain = {k: v for k, v in state_dict.items()
             if not re.fullmatch(checkpoint_module.AGENT_ONLY_KEYS, k)
             and not re.fullmatch(r'norm\d\..+', k)}
    for name, module in model.named_modules():
        if name.endswith('.attn') and hasattr(module, 'an_bias'):
            heads = module.num_heads
            plain[f'{name}.relative_position_bias_table'] = torch.randn(
                13 * 13, heads)
            plain[f'{name}.relative_position_index'] = torch.zeros(
                49, 49, dtype=torch.long)
    plain['layers.0.blocks.1.attn_mask'] = torch.zeros(64, 49, 49)
    plain.update({'norm.weight': torch.ones(128), 'norm.bias': torch.zeros(
        128), 'head.weight': torch.zeros(1000, 128),
        'head.bias': torch.zeros(1000)})
    return plain


@pytest.mark.parametrize('arch', ['pvt', 'swin'])
def test_plain_imagenet_checkpoint_loads_shared_weights(tmp_path,
                                                        log_messages, arch):
    if arch == 'pvt':
        source = _source(lambda: AgentPVT(**SMALL_PVT))
        saved = _plain_pvt_layout(source.state_dict())
    else:
        source = _source(lambda: AgentSwinTransformer(**SMALL_SWIN))
        saved = _plain_swin_layout(source, source.state_dict())
    path = str(tmp_path / f'plain_{arch}.pth')
    torch.save({'model': saved}, path)

    model = (AgentPVT(**SMALL_PVT) if arch == 'pvt' else
             AgentSwinTransformer(**SMALL_SWIN))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model.init_cfg = dict(type='Pretrained', checkpoint=path)
    model.init_weights()

    agent_keys = [k for k in initial
                  if re.fullmatch(checkpoint_module.AGENT_ONLY_KEYS, k)]
    assert agent_keys
    for key, value in model.state_dict().items():
        if key in agent_keys or key not in saved:
            assert torch.equal(value, initial[key]), key
        else:
            assert torch.equal(value, source.state_dict()[key]), key
    listed = [m for m in log_messages if 'agent-only parameters' in m]
    assert len(listed) == 1
    num_agent_modules = len({k.rsplit('.attn.', 1)[0] for k in agent_keys})
    assert f'of {num_agent_modules} agent attention modules' in listed[0]
    assert 'an_bias' in listed[0] and 'dwc.weight' in listed[0]


def test_plain_checkpoint_of_an_unrelated_model_is_still_an_error(tmp_path):
    plain_pvt = _plain_pvt_layout(_source(
        lambda: AgentPVT(**SMALL_PVT)).state_dict())
    path = str(tmp_path / 'plain_pvt.pth')
    torch.save({'model': plain_pvt}, path)
    model = AgentSwinTransformer(**SMALL_SWIN, init_cfg=dict(
        type='Pretrained', checkpoint=path))
    with pytest.raises(ValueError, match='another model'):
        model.init_weights()


def test_agent_checkpoint_with_extra_blocks_is_not_taken_for_plain(tmp_path):
    deeper = AgentPVT(**dict(SMALL_PVT, depths=[2, 1, 1, 1])).state_dict()
    path = str(tmp_path / 'deeper.pth')
    torch.save({'model': deeper}, path)
    model = AgentPVT(
        **SMALL_PVT, init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(ValueError, match='block1.1.attn.an_bias'):
        model.init_weights()


def test_output_norms_of_stages_not_output_are_skipped(tmp_path,
                                                       log_messages):
    """A detector trained with every stage's output loads into one that
    outputs fewer (as RetinaNet's out_indices=(1, 2, 3)); any other weight
    that the backbone does not have is still an error."""
    source = _source(lambda: AgentSwinTransformer(**SMALL_SWIN))
    state_dict = source.state_dict()
    path = str(tmp_path / 'all_outputs.pth')
    torch.save(downstream_layout(state_dict), path)
    model = AgentSwinTransformer(**SMALL_SWIN, out_indices=(1, 2, 3),
                                 init_cfg=dict(type='Pretrained',
                                               checkpoint=path))
    model.init_weights()

    for key, value in model.state_dict().items():
        assert torch.equal(value, state_dict[key]), key
    skipped = [m for m in log_messages if 'skipped' in m]
    assert len(skipped) == 1 and 'norm0.weight, norm0.bias' in skipped[0]

    state_dict['norm4.weight'] = torch.ones(128)  # no such stage
    torch.save(downstream_layout(state_dict), path)
    with pytest.raises(ValueError, match='does not have: norm4.weight'):
        model.init_weights()
