"""Swin and PVT weights in mmdet's / mmseg's layout load into the agent
backbones as the original weights would."""
import pytest
import torch
from backbone_checks import downstream_layout, random_weights

from agent_mm.models import AgentPVT, AgentSwinTransformer
from agent_mm.models.openmmlab_layouts import to_original_layout

SWIN = dict(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4])
PVT = dict(num_layers=[1, 1, 1, 1])
PVT_STAGE_NORMS = dict(PVT, norm_after_stage=True)


def _openmmlab_backbone(name, **settings):
    """mmseg's / mmdet's own Swin or PVT, random weights, in eval mode."""
    if name == 'mmseg_swin':
        from mmseg.models.backbones import SwinTransformer as backbone
    elif name == 'mmdet_swin':
        from mmdet.models.backbones import SwinTransformer as backbone
    else:
        from mmdet.models.backbones import PyramidVisionTransformer as backbone
    model = random_weights(backbone(**settings, drop_path_rate=0.), seed=2,
                           std=0.2)
    model.eval()  # their train() returns None
    return model


# mmseg's pre-converted ImageNet files are a bare state dict; models trained
# with mmdet / mmseg keep the backbone under "backbone." in "state_dict".
def _bare(weights):
    return weights


@pytest.mark.parametrize('name, agent_backbone, settings, layout', [
    ('mmseg_swin', AgentSwinTransformer, SWIN, _bare),
    ('mmdet_swin', AgentSwinTransformer, SWIN, downstream_layout),
    ('mmdet_pvt', AgentPVT, PVT, downstream_layout),
    ('mmdet_pvt', AgentPVT, PVT_STAGE_NORMS, downstream_layout),
])
def test_weights_give_that_backbones_features(tmp_path, log_messages, name,
                                              agent_backbone, settings,
                                              layout):
    """The all-plain agent backbone (no agent attention stage) loaded with
    an OpenMMLab backbone's weights computes its features."""
    reference = _openmmlab_backbone(name, **settings)
    path = str(tmp_path / f'{name}.pth')
    torch.save(layout(reference.state_dict()), path)

    model = agent_backbone(**settings, attn_type='BBBB', init_cfg=dict(
        type='Pretrained', checkpoint=path))
    model.init_weights()
    model.eval()
    img = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        outs, expected = model(img), reference(img)
    for out, ref in zip(outs, expected, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert any('converted to the original layout' in m for m in log_messages)
    assert any(f'Loaded {len(model.state_dict())}/' in m
               for m in log_messages)


@pytest.mark.parametrize('name, agent_backbone, settings, pairs', [
    ('mmseg_swin', AgentSwinTransformer, SWIN,
     [('stages.3.blocks.1.ffn.layers.0.0.weight',
       'layers.3.blocks.1.mlp.fc1.weight'),
      ('stages.0.blocks.0.attn.w_msa.qkv.bias',
       'layers.0.blocks.0.attn.qkv.bias'),
      ('patch_embed.projection.weight', 'patch_embed.proj.weight')]),
    ('mmdet_pvt', AgentPVT, PVT,
     [('layers.3.1.1.ffn.layers.3.bias', 'block4.0.mlp.fc2.bias'),
      ('layers.0.1.1.attn.attn.out_proj.weight', 'block1.0.attn.proj.weight'),
      ('layers.2.1.0.pos_embed', 'pos_embed3'),
      ('layers.1.0.projection.weight', 'patch_embed2.proj.weight')]),
    ('mmdet_pvt', AgentPVT, PVT_STAGE_NORMS,
     [('layers.0.2.weight', 'norm1.weight'),
      ('layers.3.2.bias', 'norm4.bias')]),
])
def test_agent_backbone_loads_the_shared_weights(tmp_path, log_messages,
                                                 name, agent_backbone,
                                                 settings, pairs):
    reference = _openmmlab_backbone(name, **settings)
    path = str(tmp_path / f'{name}.pth')
    torch.save(reference.state_dict(), path)

    model = agent_backbone(**settings, init_cfg=dict(
        type='Pretrained', checkpoint=path))
    model.init_weights()
    weights, own = reference.state_dict(), model.state_dict()
    for key, original in pairs:
        assert torch.equal(own[original], weights[key]), original
    assert any('agent-only parameters' in m for m in log_messages)


def test_pvt_stage_norms_are_not_taken_for_unbuilt_output_norms(tmp_path):
    """mmdet PVT weights with norms after the stages do not fit an Agent-PVT
    without them, even one that outputs fewer stages: those norms are not
    Agent-Swin's output norms, skipped for the stages not output."""
    reference = _openmmlab_backbone('mmdet_pvt', **PVT_STAGE_NORMS)
    path = str(tmp_path / 'mmdet_pvt.pth')
    torch.save(reference.state_dict(), path)
    model = AgentPVT(**PVT, out_indices=(1, 2, 3), init_cfg=dict(
        type='Pretrained', checkpoint=path))
    with pytest.raises(ValueError, match='does not have: norm1.weight'):
        model.init_weights()


def test_pvt_attention_projection_splits_into_q_and_kv():
    weights = _openmmlab_backbone('mmdet_pvt', **PVT).state_dict()
    converted, layout = to_original_layout(weights)
    in_proj = weights['layers.1.1.1.attn.attn.in_proj_weight']
    assert layout == "mmdet's PVT"
    assert torch.equal(
        torch.cat([converted['block2.0.attn.q.weight'],
                   converted['block2.0.attn.kv.weight']]), in_proj)
    assert converted['block2.0.attn.q.weight'].shape == (128, 128)
    assert converted['block1.0.mlp.fc1.weight'].shape == (512, 64)


def test_original_layouts_are_left_as_they_are():
    weights = AgentPVT(**PVT).state_dict()
    converted, layout = to_original_layout(weights)
    assert layout is None and converted is weights
    swin = AgentSwinTransformer(**SWIN).state_dict()
    assert to_original_layout(swin) == (swin, None)
