"""AgentSwinTransformer: shapes, fidelity to the spec, options, errors."""
import pytest
import torch
from backbone_checks import (assert_bias_cache_settings_reach_every_attention,
                             assert_channels_last_outputs_are_the_same_maps,
                             assert_checkpointing_is_transparent,
                             assert_every_parameter_gets_gradient,
                             assert_frozen,
                             assert_inference_calls_what_the_modules_are,
                             assert_parity, tiny)
from reference_agent import ReferenceAgentSwin, randomize_

from agent_mm.models import AgentAttention, AgentSwinTransformer
from agent_mm.models.agent_swin import parse_attn_type
from agent_mm.models.window_attention import ShiftWindowAttention


@pytest.mark.parametrize('arch, dims, blocks', [('tiny', 96, 12),
                                                ('small', 96, 24),
                                                ('base', 128, 24)])
def test_every_arch_builds_and_gives_four_strided_maps(arch, dims, blocks):
    model = AgentSwinTransformer(arch=arch).eval()
    assert sum(len(stage.blocks) for stage in model.layers) == blocks
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape for o in outs] == [(1, dims * 2**i, 16 // 2**i, 16 // 2**i)
                                       for i in range(4)]
    # NCHW memory: mmcv's C++ ops (RoIAlign) misread channels-last maps
    assert all(o.is_contiguous() for o in outs)


def test_block_types_follow_the_arch_code():
    model = AgentSwinTransformer(arch='base')
    kinds = [[type(b.attn) for b in stage.blocks] for stage in model.layers]
    assert kinds[0] == kinds[1] == [AgentAttention] * 2
    assert kinds[2] == [AgentAttention] * 2 + [ShiftWindowAttention] * 16
    assert kinds[3] == [ShiftWindowAttention] * 2
    shifts = [getattr(b.attn, 'shift', 0) for b in model.layers[2].blocks]
    assert shifts == [0, 0] + [0, 3] * 8


@pytest.mark.parametrize('code, expected', [
    ('AAAB', ['AA', 'AA', 'AAAAAA', 'BB']),
    ('AAMB2', ['AA', 'AA', 'AABBBB', 'BB']),
    ('BMAA1', ['BB', 'AB', 'AAAAAA', 'AA']),
])
def test_parse_attn_type(code, expected):
    assert parse_attn_type(code, [2, 2, 6, 2]) == expected


@pytest.mark.parametrize('code', ['AAB', 'AAMB', 'AAAB2', 'AAMC2', 'AAMB9'])
def test_bad_attn_type_is_a_value_error(code):
    with pytest.raises(ValueError, match='attn_type'):
        AgentSwinTransformer(attn_type=code)


def test_too_many_agent_blocks_of_the_mixed_stage_says_how_to_fix_it():
    with pytest.raises(ValueError, match="end attn_type with at most 6, or "
                       "give the 'M' stage at least 9 blocks"):
        parse_attn_type('AAMB9', [2, 2, 6, 2])


@pytest.mark.parametrize('attn_type', ['AAAB', 'AAMB2', 'BBMA1'])
@pytest.mark.parametrize('size', [(96, 128), (100, 150), (224, 224)])
def test_matches_spec_reference(attn_type, size):
    reference = ReferenceAgentSwin(
        depths=(2, 2, 4, 2),
        embed_dims=32,
        num_heads=(1, 2, 4, 8),
        attn_type=attn_type)
    randomize_(reference, seed=7)
    model = AgentSwinTransformer(
        embed_dims=32,
        depths=[2, 2, 4, 2],
        num_heads=[1, 2, 4, 8],
        attn_type=attn_type)
    assert_parity(model, reference, torch.randn(2, 3, *size))


def test_out_indices_and_their_norms_match_reference():
    reference = ReferenceAgentSwin(
        depths=(1, 1, 1, 1),
        embed_dims=16,
        num_heads=(1, 2, 2, 4),
        out_indices=(1, 3))
    randomize_(reference, seed=8)
    model = AgentSwinTransformer(
        embed_dims=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 2, 4],
        out_indices=(1, 3))
    assert not hasattr(model, 'norm0')
    assert_parity(model, reference, torch.randn(1, 3, 64, 96))


@pytest.mark.parametrize('size', [(32, 32), (33, 45), (32, 400), (250, 36)])
def test_any_input_size(size):
    model = AgentSwinTransformer(
        embed_dims=16,
        depths=[1, 1, 2, 1],
        num_heads=[1, 1, 2, 2],
        attn_type='ABMB1').eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *size))
    height, width = size
    for out, stride in zip(outs, (4, 8, 16, 32)):
        assert out.shape[-2:] == (-(-height // stride), -(-width // stride))
        assert torch.isfinite(out).all()


def test_gradients_reach_every_parameter():
    model = AgentSwinTransformer(
        embed_dims=16,
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 2, 4],
        attn_type='AMBB1')
    model.init_weights()
    assert_every_parameter_gets_gradient(model, torch.randn(2, 3, 64, 64))


def test_bias_cache_settings_reach_every_attention():
    assert_bias_cache_settings_reach_every_attention(
        lambda **kwargs: AgentSwinTransformer(
            embed_dims=16,
            depths=[2, 2, 2, 2],
            num_heads=[1, 2, 2, 4],
            attn_type='AABB',
            **kwargs), torch.randn(1, 3, 64, 64))


def test_channels_last_outputs_are_the_same_maps():
    assert_channels_last_outputs_are_the_same_maps(
        lambda **kwargs: AgentSwinTransformer(
            embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
            attn_type='AABB', **kwargs), torch.randn(2, 3, 64, 96))


def test_with_cp_gives_same_outputs_and_gradients():
    assert_checkpointing_is_transparent(
        lambda with_cp: AgentSwinTransformer(
            embed_dims=16,
            depths=[2, 2, 2, 2],
            num_heads=[1, 2, 2, 4],
            attn_type='AABB',
            drop_path_rate=0.,
            with_cp=with_cp), torch.randn(1, 3, 64, 64))


def test_frozen_stages():
    model = AgentSwinTransformer(
        embed_dims=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 2, 4],
        frozen_stages=1)
    assert_frozen(model, ['patch_embed', 'pos_drop', 'layers.0', 'norm0'],
                  ['layers.1', 'layers.2', 'norm1', 'norm3'])


def test_arch_fields_are_overridable():
    model = AgentSwinTransformer(
        arch='small', agent_shapes=[(9, 9), (5, 5), (7, 7), (7, 7)])
    assert model.layers[1].blocks[0].attn.agent_shape == (5, 5)
    assert model.layers[0].blocks[0].attn.agent_shape == (9, 9)


@pytest.mark.parametrize('kwargs, message', [
    (dict(arch='large'), "valid names: \\['base', 'small', 'tiny'\\]"),
    (dict(num_heads=[3, 6, 12]), 'num_heads needs 4 entries'),
    (dict(agent_num=[9, 15, 49, 49]), 'square number'),
])
def test_bad_arch_is_a_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AgentSwinTransformer(**kwargs)


@pytest.mark.parametrize('shape, message', [((1, 1, 64, 64), '3, H, W'),
                                            ((1, 3, 64, 20), 'at least 32')])
def test_bad_images_are_rejected(shape, message):
    model = AgentSwinTransformer(
        embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4])
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


def test_inference_calls_hooked_and_quantized_layers():
    torch.manual_seed(0)
    assert_inference_calls_what_the_modules_are(tiny('swin'),
                                                torch.randn(1, 3, 64, 96))
