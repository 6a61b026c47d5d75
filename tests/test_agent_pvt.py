"""AgentPVT: shapes, fidelity to the spec, training options, errors."""
import pytest
import torch
from backbone_checks import (assert_bias_cache_settings_reach_every_attention,
                             assert_channels_last_outputs_are_the_same_maps,
                             assert_checkpointing_is_transparent,
                             assert_every_parameter_gets_gradient,
                             assert_frozen,
                             assert_inference_calls_what_the_modules_are,
                             assert_parity, tiny)
from reference_agent import ReferenceAgentPVT, randomize_

from agent_mm.models import AgentPVT

CHANNELS = (64, 128, 320, 512)


@pytest.mark.parametrize('arch, blocks', [('tiny', 8), ('small', 16),
                                          ('medium', 28), ('large', 41)])
def test_every_arch_builds_and_gives_four_strided_maps(arch, blocks):
    model = AgentPVT(arch=arch).eval()
    assert sum(len(getattr(model, f'block{i}')) for i in range(1, 5)) == blocks
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape for o in outs] == [(1, c, 64 // s, 64 // s)
                                       for c, s in zip(CHANNELS,
                                                       (4, 8, 16, 32))]
    # NCHW memory: mmcv's C++ ops (RoIAlign) misread channels-last maps
    assert all(o.is_contiguous() for o in outs)


@pytest.mark.parametrize('size', [(32, 32), (50, 77), (224, 224),
                                  (32, 200), (130, 40)])
def test_any_input_size(size):
    model = AgentPVT(depths=[1, 1, 1, 1]).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *size))
    height, width = size
    for out, stride in zip(outs, (4, 8, 16, 32)):
        assert out.shape[0] == 2
        assert out.shape[-2:] == (height // stride, width // stride)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize('attn_type', ['AAAA', 'AABA', 'BBAB'])
@pytest.mark.parametrize('size', [(64, 96), (224, 224)])
def test_matches_spec_reference(attn_type, size):
    reference = ReferenceAgentPVT(depths=(1, 1, 2, 1), attn_type=attn_type)
    randomize_(reference, seed=3)
    model = AgentPVT(depths=[1, 1, 2, 1], attn_type=attn_type)
    assert_parity(model, reference, torch.randn(2, 3, *size))


def test_reference_attention_path_matches_too():
    reference = ReferenceAgentPVT(depths=(1, 1, 1, 1))
    randomize_(reference, seed=4)
    model = AgentPVT(depths=[1, 1, 1, 1], attn_impl='reference')
    assert_parity(model, reference, torch.randn(1, 3, 96, 64))


def test_position_embedding_resized_by_grid_not_token_count():
    # stage 2 of a 448x112 image has 56x14 = 784 tokens, as many as the
    # 28x28 reference grid, but another shape: it must still be resized.
    reference = ReferenceAgentPVT(depths=(1, 1, 1, 1))
    randomize_(reference, seed=5)
    model = AgentPVT(depths=[1, 1, 1, 1])
    assert_parity(model, reference, torch.randn(1, 3, 448, 112))


def test_gradients_reach_every_parameter():
    model = AgentPVT(depths=[1, 1, 1, 1], attn_type='AABB')
    model.init_weights()
    assert_every_parameter_gets_gradient(model, torch.randn(2, 3, 64, 64))


def test_bias_cache_settings_reach_every_attention():
    assert_bias_cache_settings_reach_every_attention(
        lambda **kwargs: AgentPVT(depths=[1, 1, 1, 1], **kwargs),
        torch.randn(1, 3, 64, 64))


def test_channels_last_outputs_are_the_same_maps():
    assert_channels_last_outputs_are_the_same_maps(
        lambda **kwargs: AgentPVT(depths=[1, 1, 1, 1], **kwargs),
        torch.randn(1, 3, 64, 64))


def test_with_cp_gives_same_outputs_and_gradients():
    assert_checkpointing_is_transparent(
        lambda with_cp: AgentPVT(depths=[1, 1, 1, 1], drop_path_rate=0.,
                                 with_cp=with_cp),
        torch.randn(1, 3, 64, 64))


def test_frozen_stages():
    model = AgentPVT(depths=[1, 1, 1, 1], frozen_stages=2, drop_rate=0.5)
    assert_frozen(model, ['patch_embed1', 'pos_embed1', 'pos_drop1', 'block1',
                          'patch_embed2', 'pos_embed2', 'pos_drop2', 'block2'],
                  ['patch_embed3', 'pos_drop3', 'block3', 'block4'])
    outs = model(torch.randn(1, 3, 64, 64))
    sum(o.sum() for o in outs).backward()
    assert model.block1[0].attn.q.weight.grad is None
    assert model.block3[0].attn.q.weight.grad is not None


def test_drop_path_rises_linearly_over_all_blocks():
    model = AgentPVT(arch='small', drop_path_rate=0.3)
    rates = [
        getattr(block.drop_path, 'drop_prob', 0.)
        for i in range(1, 5) for block in getattr(model, f'block{i}')
    ]
    expected = torch.linspace(0, 0.3, 16).tolist()
    assert rates == pytest.approx(expected)


def test_out_indices_selects_stages():
    model = AgentPVT(depths=[1, 1, 1, 1], out_indices=(1, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [128, 512]


def test_arch_fields_are_overridable():
    model = AgentPVT(arch='tiny', embed_dims=[32, 64, 96, 128],
                     num_heads=[1, 2, 3, 4], agent_shapes=[(4, 4)] * 4)
    assert model.patch_embed4.proj.out_channels == 128
    assert model.block1[0].attn.agent_shape == (4, 4)
    custom = dict(AgentPVT.arch_zoo['tiny'], depths=[1, 1, 1, 1])
    assert len(AgentPVT(arch=custom).block1) == 1


@pytest.mark.parametrize('kwargs, message', [
    (dict(arch='huge'), "valid names: \\['large', 'medium', 'small', 'tiny'"),
    (dict(depths=[2, 2, 2]), 'depths needs 4 entries'),
    (dict(attn_type='AAAC'), "'A' \\(agent attention\\) or 'B'"),
    (dict(arch=dict(depths=[1, 1, 1, 1])), 'missing'),
    (dict(out_indices=(4, )), 'out_indices'),
])
def test_bad_arch_is_a_value_error_listing_what_is_valid(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AgentPVT(**kwargs)


@pytest.mark.parametrize('shape, message', [((1, 1, 64, 64), '3, H, W'),
                                            ((1, 4, 64, 64), '3, H, W'),
                                            ((1, 3, 31, 64), 'at least 32')])
def test_bad_images_are_rejected(shape, message):
    model = AgentPVT(depths=[1, 1, 1, 1])
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


def test_pretrained_is_deprecated_in_favour_of_init_cfg():
    with pytest.warns(UserWarning, match='init_cfg'):
        model = AgentPVT(depths=[1, 1, 1, 1], pretrained='some.pth')
    assert model.init_cfg == dict(type='Pretrained', checkpoint='some.pth')
    with pytest.raises(ValueError, match='not both'):
        AgentPVT(pretrained='a.pth', init_cfg=dict(type='Pretrained',
                                                   checkpoint='b.pth'))


def test_inference_calls_hooked_and_quantized_layers():
    torch.manual_seed(0)
    assert_inference_calls_what_the_modules_are(tiny('pvt'),
                                                torch.randn(1, 3, 64, 96))


def test_partly_frozen_biases_train_in_eval_mode():
    # only the biases train, one of them frozen: the maps of every forward
    # are built with autograd (not into the workspace's buffers)
    model = tiny('pvt').eval()
    model.requires_grad_(False)
    trained = ('na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')
    for name, param in model.named_parameters():
        param.requires_grad_(name.split('.')[-1] in trained)
    for _ in range(2):
        model.zero_grad()
        sum(out.square().sum()
            for out in model(torch.randn(1, 3, 64, 64))).backward()
        assert all(param.grad is not None
                   for param in model.parameters() if param.requires_grad)
