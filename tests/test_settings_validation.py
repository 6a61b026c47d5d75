"""Every setting is validated at construction, with a ``ValueError`` naming
the argument, the value, the allowed range and the fix; an empty batch gives
empty outputs of the right shapes."""
import math
import re

import pytest
import torch
from backbone_checks import TINY_SETTINGS, error_message, tiny

from agent_mm.models import AgentAttention
from agent_mm.models.sr_attention import SpatialReductionAttention
from agent_mm.models.window_attention import ShiftWindowAttention

# (backbones, argument, value, stage): ``stage`` is the bad entry of a
# per-stage list, None for a scalar argument.
BAD_BACKBONE_SETTINGS = [
    (('pvt', 'swin'), 'depths', [-1, 2, 2, 2], 0),
    (('pvt', 'swin'), 'depths', [1, 0, 1, 1], 1),
    (('pvt', 'swin'), 'depths', [1, 1, 1.5, 1], 2),
    (('pvt', 'swin'), 'depths', [True, 1, 1, 1], 0),
    (('pvt', 'swin'), 'bias_cache_max_mb', -1, None),
    (('pvt', 'swin'), 'bias_cache_max_mb', math.inf, None),
    (('pvt', 'swin'), 'bias_cache_max_mb', '4096', None),
    (('pvt', 'swin'), 'drop_path_rate', 1.0, None),
    (('pvt', 'swin'), 'drop_path_rate', 1.5, None),
    (('pvt', 'swin'), 'drop_path_rate', -0.1, None),
    (('pvt', 'swin'), 'drop_path_rate', math.nan, None),
    (('pvt', 'swin'), 'drop_rate', 1.0, None),
    (('pvt', 'swin'), 'drop_rate', -0.5, None),
    (('pvt', 'swin'), 'attn_drop_rate', 1.0, None),
    (('pvt', 'swin'), 'attn_drop_rate', -0.1, None),
    (('pvt', 'swin'), 'frozen_stages', 5, None),
    (('pvt', 'swin'), 'frozen_stages', 9, None),
    (('pvt', 'swin'), 'frozen_stages', -2, None),
    (('pvt', 'swin'), 'frozen_stages', -3, None),
    (('pvt', 'swin'), 'frozen_stages', 1.0, None),
    (('pvt', 'swin'), 'frozen_stages', True, None),
    (('pvt', 'swin'), 'agent_num', [0, 16, 49, 49], 0),
    (('pvt', 'swin'), 'agent_num', [9, 15, 49, 49], 1),
    (('pvt', 'swin'), 'agent_num', [9, 16, -49, 49], 2),
    (('pvt', 'swin'), 'agent_num', [9, 16, 49, 49.0], 3),
    (('pvt', 'swin'), 'agent_shapes', [(0, 0), (2, 2), (2, 2), (2, 2)], 0),
    (('pvt', 'swin'), 'agent_shapes', [(2, 2), (2, -1), (2, 2), (2, 2)], 1),
    (('pvt', 'swin'), 'agent_shapes', [(2, 2), (2, 2), (2, ), (2, 2)], 2),
    (('pvt', 'swin'), 'agent_shapes', [(2, 2), (2, 2), (2, 2), (2., 2)], 3),
    (('pvt', 'swin'), 'num_heads', [0, 2, 2, 4], 0),
    (('pvt', 'swin'), 'num_heads', [1, 3, 2, 4], 1),
    (('pvt', 'swin'), 'num_heads', [1, 2, True, 4], 2),
    (('pvt', 'swin'), 'in_channels', 0, None),
    (('pvt', 'swin'), 'in_channels', -3, None),
    (('pvt', 'swin'), 'in_channels', True, None),
    (('pvt', ), 'embed_dims', [0, 16, 16, 32], 0),
    (('pvt', ), 'embed_dims', [8, -16, 16, 32], 1),
    (('pvt', ), 'mlp_ratios', [8, 0, 4, 4], 1),
    (('pvt', ), 'mlp_ratios', [8, 8, -4, 4], 2),
    (('pvt', ), 'mlp_ratios', [8, 8, 4, math.inf], 3),
    (('pvt', ), 'sr_ratios', [0, 4, 2, 1], 0),
    (('pvt', ), 'sr_ratios', [8, 4, 2, 0.5], 3),
    (('swin', ), 'embed_dims', 0, None),
    (('swin', ), 'embed_dims', -96, None),
    (('swin', ), 'window_size', 0, None),
    (('swin', ), 'window_size', -7, None),
    (('swin', ), 'window_size', 7.0, None),
    (('swin', ), 'mlp_ratio', 0, None),
    (('swin', ), 'mlp_ratio', -4., None),
    (('swin', ), 'mlp_ratio', math.nan, None),
]

BAD_ATTENTION_SETTINGS = [
    ('embed_dims', 0),
    ('embed_dims', -32),
    ('embed_dims', True),
    ('num_heads', 0),
    ('num_heads', 5),
    ('num_heads', -2),
    ('num_heads', 2.0),
    ('pretrain_grid', (0, 7)),
    ('pretrain_grid', (7, )),
    ('pretrain_grid', 7),
    ('agent_num', 0),
    ('agent_num', 10),
    ('agent_num', -9),
    ('agent_shape', (0, 0)),
    ('agent_shape', (7, )),
    ('agent_shape', (7, -7)),
    ('attn_drop', 1.0),
    ('attn_drop', -0.1),
    ('proj_drop', 1.5),
    ('bias_cache_size', -1),
    ('bias_cache_size', True),
    ('bias_cache_admit_after', 0),
    ('bias_cache_admit_after', -1),
    ('bias_cache_admit_after', 1.5),
    ('bias_cache_admit_after', False),
    ('attn_impl', 'fused'),
]


def _cases(settings):
    return [
        pytest.param(name, arg, value, stage, id=f'{name}-{arg}={value}')
        for names, arg, value, stage in settings for name in names
    ]


@pytest.mark.parametrize('name, arg, value, stage',
                         _cases(BAD_BACKBONE_SETTINGS))
def test_bad_backbone_setting_is_a_value_error(name, arg, value, stage):
    argument, bad = (arg, value) if stage is None else (f'{arg}[{stage}]',
                                                        value[stage])
    with pytest.raises(ValueError, match=error_message(argument, bad)):
        tiny(name, **{arg: value})


@pytest.mark.parametrize('arg, value', BAD_ATTENTION_SETTINGS)
def test_bad_attention_setting_is_a_value_error(arg, value):
    settings = dict(embed_dims=32, num_heads=2, pretrain_grid=(7, 7))
    settings[arg] = value
    with pytest.raises(ValueError, match=error_message(arg, value)):
        AgentAttention(**settings)


@pytest.mark.parametrize('name, kwargs, message', [
    ('pvt', dict(frozen_stages=5), r'an int in -1\.\.4.*-1 freezes nothing'),
    ('swin', dict(drop_path_rate=1.0), r'in \[0, 1\).*NaN in training'),
    ('swin', dict(window_size=0), 'an int >= 1, got 0. The released'),
    ('pvt', dict(num_heads=[1, 3, 2, 4]),
     r'16 channels are divisible, got 3\. Use one of \[1, 2, 4, 8, 16\]'),
    ('swin', dict(num_heads=[1, 2, 2, 5]), r'num_heads\[3\] .* 64 channels'),
    ('swin', dict(agent_num=[9, 16, 49, 50]), 'square number'),
])
def test_messages_give_the_range_and_the_fix(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(name, **kwargs)


@pytest.mark.parametrize('name', sorted(TINY_SETTINGS))
@pytest.mark.parametrize('kwargs', [
    dict(drop_path_rate=0.0),
    dict(drop_path_rate=0.99, drop_rate=0.5, attn_drop_rate=0.99),
    dict(frozen_stages=-1),
    dict(frozen_stages=4),
    dict(agent_num=[1, 1, 1, 1], agent_shapes=[(1, 1)] * 4),
    dict(out_indices=(3, )),
    dict(in_channels=1),
])
def test_valid_edge_settings_build_and_train(name, kwargs):
    model = tiny(name, **kwargs)
    model.train()
    outs = model(torch.randn(2, model.in_channels, 32, 32))
    assert all(torch.isfinite(out).all() for out in outs)


@pytest.mark.parametrize('kwargs', [
    dict(window_size=1),
    dict(mlp_ratio=0.5),
    dict(embed_dims=1, num_heads=[1, 1, 1, 1]),
])
def test_valid_edge_swin_settings_build(kwargs):
    model = tiny('swin', **kwargs)
    assert len(model(torch.randn(1, 3, 32, 32))) == 4


@pytest.mark.parametrize('name', sorted(TINY_SETTINGS))
def test_frozen_stages_4_freezes_every_stage(name):
    model = tiny(name, frozen_stages=4).train()
    assert not any(p.requires_grad for p in model.parameters())


def test_valid_edge_attention_settings_build():
    module = AgentAttention(
        1, 1, pretrain_grid=(1, 1), agent_num=1, agent_shape=(1, 1),
        attn_drop=0.99)
    assert module(torch.randn(2, 6, 1), (2, 3)).shape == (2, 6, 1)


@pytest.mark.parametrize('name', sorted(TINY_SETTINGS))
@pytest.mark.parametrize('size', [(64, 64), (70, 45), (33, 97)])
@pytest.mark.parametrize('training', [False, True])
def test_empty_batch_gives_empty_outputs_of_the_right_shapes(
        name, size, training):
    model = tiny(name, out_indices=(0, 2, 3)).train(training)
    one = model(torch.randn(1, 3, *size))
    empty = model(torch.randn(0, 3, *size))
    assert [out.shape for out in empty] == [(0, ) + out.shape[1:]
                                            for out in one]
    if training:
        sum(out.sum() for out in empty).backward()


@pytest.mark.parametrize('attn_impl', ['fast', 'reference'])
@pytest.mark.parametrize('training', [False, True])
def test_attention_on_an_empty_batch(attn_impl, training):
    module = AgentAttention(
        16,
        2,
        pretrain_grid=(7, 7),
        agent_num=9,
        agent_shape=(3, 3),
        attn_impl=attn_impl).train(training)
    x = torch.randn(0, 35, 16, requires_grad=training)
    out = module(x, (5, 7))
    assert out.shape == (0, 35, 16)
    if training:
        out.sum().backward()
        for name, param in module.named_parameters():
            assert torch.equal(param.grad, torch.zeros_like(param)), name


def _mixers():
    """The three token mixers on 16 channels."""
    return [
        AgentAttention(16, 2, pretrain_grid=(7, 7), agent_num=9,
                       agent_shape=(3, 3)),
        ShiftWindowAttention(16, 2, window_size=3, shift=1),
        SpatialReductionAttention(16, 2, sr_ratio=2),
    ]


@pytest.mark.parametrize('mixer', _mixers(), ids=lambda m: type(m).__name__)
@pytest.mark.parametrize('shape, fix', [
    ((1, 16, 5, 7), r'Flatten a \(B, C, H, W\) map to tokens'),
    ((1, 35, 8), 'Give tokens of the 16 channels'),
    ((1, 34, 16), r'Give hw_shape=\(H, W\) of the grid .*: H\*W must be '
     'their number'),
])
def test_token_mixers_say_what_tokens_they_expect(mixer, shape, fix):
    name = type(mixer).__name__
    message = (rf'{name} expects \(B, H\*W, C=16\) tokens laid out as '
               rf'hw_shape=\(5, 7\) \(35 tokens\), got a tensor of shape '
               rf'{re.escape(str(shape))}\. {fix}')
    with pytest.raises(ValueError, match=message):
        mixer(torch.randn(*shape), (5, 7))
    assert mixer(torch.randn(2, 35, 16), (5, 7)).shape == (2, 35, 16)


def test_agent_attention_points_maps_to_agent_attention_2d():
    with pytest.raises(ValueError, match='or use AgentAttention2d'):
        _mixers()[0](torch.randn(1, 16, 5, 7), (5, 7))


@pytest.mark.parametrize('name', sorted(TINY_SETTINGS))
@pytest.mark.parametrize('shape, message', [
    ((3, 64, 64), r'got \(3, 64, 64\)\. Add the batch dimension to a '
     r'single \(C, H, W\) image: img\.unsqueeze\(0\)'),
    ((1, 1, 3, 64, 64), r'got \(1, 1, 3, 64, 64\)\. Give a 4-D batch'),
    ((1, 4, 64, 64), r'got \(1, 4, 64, 64\)\. Convert the images to 3 '
     'channels .* or set in_channels=4'),
])
def test_bad_image_shapes_get_their_own_fix(name, shape, message):
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\), ' + message):
        tiny(name)(torch.randn(*shape))


@pytest.mark.parametrize('name', sorted(TINY_SETTINGS))
@pytest.mark.parametrize('kwargs, message', [
    (dict(out_indices=(4, )),
     r'got \(4,\)\. List the stages .* \(0, 1, 2, 3\) for all of them'),
    (dict(out_indices=()), r'got \(\)\. List the stages'),
    (dict(depths=[1, 1, 1]),
     r'depths needs 4 entries \(one per stage\), got \[1, 1, 1\]\. Give a '
     'list of 4 values, stage 0 first'),
])
def test_list_errors_say_how_to_fix_them(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(name, **kwargs)
