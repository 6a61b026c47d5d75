"""Constructor compatibility with mmdet's / mmseg's Swin and PVT backbones.

Changing only ``type`` (and ``init_cfg=None``: nothing is downloaded) in
mmdet's and mmseg's own Swin / PVT configs builds an agent backbone that
trains and predicts; every keyword of their constructors is accepted, with
the same meaning where the agent backbone has the concept, and a value it
cannot honour is a ``ValueError`` naming it and saying what is supported.
"""
import inspect
import re

import pytest
import torch
import torch.nn as nn
from backbone_checks import error_message, tiny
from mm_models import one_thread  # noqa: F401  (autouse: 1 thread)
from mm_models import IMAGE_SIZE, build_model, det_batch, seg_batch
from mmdet.models.backbones.pvt import PyramidVisionTransformer
from mmdet.models.backbones.swin import SwinTransformer as DetSwin
from mmengine.config import Config
from mmseg.models.backbones.swin import SwinTransformer as SegSwin

from agent_mm.models import AgentAttention, AgentPVT, AgentSwinTransformer
from agent_mm.models.layers import Mlp
from agent_mm.models.sr_attention import SpatialReductionAttention
from agent_mm.models.window_attention import ShiftWindowAttention

BACKBONES = dict(pvt=AgentPVT, swin=AgentSwinTransformer)
# (base config, backbone type): mmdet's / mmseg's own Swin and PVT configs
TYPE_SWAPS = {
    'mmdet-swin': ('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
                   'AgentSwinTransformer'),
    'mmseg-swin':
    ('mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_'
     'ade20k-512x512.py', 'AgentSwinTransformer'),
    'mmdet-pvt': ('mmdet::pvt/retinanet_pvt-t_fpn_1x_coco.py', 'AgentPVT'),
}
ATTENTIONS = (AgentAttention, ShiftWindowAttention, SpatialReductionAttention)


def _write_type_swap(tmp_path, base: str, backbone: str) -> str:
    """The config a user writes: the base, agent_mm imported, only the
    backbone type changed (and no pretrained weights)."""
    path = tmp_path / 'type_swap.py'
    path.write_text(
        f'_base_ = {base!r}\n'
        "custom_imports = dict(imports=['agent_mm'], "
        'allow_failed_imports=False)\n'
        f'model = dict(backbone=dict(type={backbone!r}, init_cfg=None))\n')
    return str(path)


def _outputs(model: nn.Module, img: torch.Tensor) -> tuple:
    with torch.no_grad():
        return model.eval()(img)


def _assert_same_outputs(model: nn.Module, other: nn.Module,
                         img: torch.Tensor) -> None:
    for out, ref in zip(_outputs(model, img), _outputs(other, img),
                        strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _differs(model: nn.Module, other: nn.Module, img: torch.Tensor) -> bool:
    return any(not torch.allclose(out, ref, atol=1e-6)
               for out, ref in zip(_outputs(model, img), _outputs(other, img)))


def _copy_weights(model: nn.Module, source: nn.Module) -> nn.Module:
    """``model`` with every weight ``source`` has (the others kept)."""
    model.load_state_dict(source.state_dict(), strict=False)
    return model


# ----------------------------------------------------------------------
# mmdet's / mmseg's configs with only the type changed
@pytest.mark.parametrize('swap', sorted(TYPE_SWAPS))
def test_type_swapped_config_trains_and_predicts(tmp_path, swap):
    base, backbone = TYPE_SWAPS[swap]
    cfg = Config.fromfile(_write_type_swap(tmp_path, base, backbone))
    segmentation = cfg.default_scope == 'mmseg'
    model = build_model(cfg)
    model.init_weights()
    assert type(model.backbone).__name__ == backbone
    # the config's own settings reached the backbone (0.1: both defaults)
    last_block = [m for m in model.backbone.modules() if hasattr(m, 'mlp')][-1]
    assert last_block.drop_path.drop_prob == pytest.approx(
        cfg.model.backbone.get('drop_path_rate', 0.1))

    model.train()
    if segmentation:
        batch = seg_batch(IMAGE_SIZE, 2, cfg.model.decode_head.num_classes)
    else:
        batch = det_batch(IMAGE_SIZE, True, 'roi_head' in cfg.model)
    data = model.data_preprocessor(batch, True)
    loss, _ = model.parse_losses(
        model.loss(data['inputs'], data['data_samples']))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.backbone.parameters())

    model.eval()
    batch = (seg_batch(IMAGE_SIZE, 1, cfg.model.decode_head.num_classes)
             if segmentation else det_batch(IMAGE_SIZE, False, False))
    with torch.no_grad():
        data = model.data_preprocessor(batch, False)
        results = model.predict(data['inputs'], data['data_samples'])
    assert len(results) == 1
    if segmentation:
        assert results[0].pred_sem_seg.shape == (IMAGE_SIZE, IMAGE_SIZE)
    else:
        assert torch.isfinite(results[0].pred_instances.bboxes).all()


@pytest.mark.parametrize('mm_backbone, ours, same_as', [
    (DetSwin, AgentSwinTransformer, {}),
    (SegSwin, AgentSwinTransformer, {}),
    (PyramidVisionTransformer, AgentPVT,
     dict(arch='small', norm_cfg=dict(type='LN', eps=1e-6))),
])
def test_every_keyword_of_mm_backbones_is_taken(mm_backbone, ours, same_as):
    """Every keyword, at mmdet's / mmseg's default, builds the agent model
    those defaults describe (PVT: mmdet's default depths are PVT-S, and all
    its norms have eps 1e-6)."""
    defaults = {
        name: param.default
        for name, param in inspect.signature(
            mm_backbone.__init__).parameters.items() if name != 'self'
    }
    model = ours(**defaults)
    expected = _copy_weights(ours(**same_as), model)
    assert model.state_dict().keys() == expected.state_dict().keys()
    _assert_same_outputs(model, expected, torch.randn(1, 3, 64, 64))


# ----------------------------------------------------------------------
# the effect of each keyword
@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_norm_cfg_reaches_every_norm(name):
    model = tiny(
        name,
        norm_cfg=dict(type='LN', eps=1e-3, requires_grad=False),
        **(dict(norm_after_stage=True) if name == 'pvt' else {}))
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    # PVT: 4 patch embeddings, 4 blocks, 1 reduction, 4 stage norms; Swin:
    # patch embedding, 5 blocks, 3 mergings, 4 outputs
    assert len(norms) == (4 + 2 * 4 + 1 + 4 if name == 'pvt' else 1 + 2 * 5 +
                          3 + 4)
    assert all(norm.eps == 1e-3 for norm in norms)
    assert not any(p.requires_grad for norm in norms
                   for p in norm.parameters())


def test_pvt_default_norms_are_the_released_ones():
    """Where mmdet's default (eps 1e-6 everywhere) differs, ours wins."""
    model = tiny('pvt')
    assert model.patch_embed1.norm.eps == 1e-5
    assert model.block1[0].norm1.eps == model.block1[0].norm2.eps == 1e-6
    assert model.block3[0].attn.norm.eps == 1e-5


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_act_cfg_reaches_every_mlp(name):
    img = torch.randn(1, 3, 64, 64)
    default = tiny(name)
    model = _copy_weights(tiny(name, act_cfg=dict(type='ReLU')), default)
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    assert len(mlps) == sum(map(len, model.drop_path_rates))
    assert all(isinstance(mlp.act, nn.ReLU) for mlp in mlps)
    assert all(
        isinstance(m.act, nn.GELU) for m in default.modules()
        if isinstance(m, Mlp))
    assert _differs(model, default, img)


def _scale(module: nn.Module):
    return module.scale if isinstance(module, AgentAttention) else (
        module.qk_scale)


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_qk_scale_reaches_every_attention(name):
    img = torch.randn(1, 3, 64, 64)
    default = tiny(name)
    model = _copy_weights(tiny(name, qk_scale=0.05), default)
    attentions = [m for m in model.modules() if isinstance(m, ATTENTIONS)]
    # both backbones mix agent and plain attention
    assert len({type(m) for m in attentions}) == 2
    assert all(_scale(m) == 0.05 for m in attentions)
    assert _differs(model, default, img)


@pytest.mark.parametrize('attention', [
    lambda **kw: ShiftWindowAttention(16, 2, 3, shift=1, **kw),
    lambda **kw: SpatialReductionAttention(16, 2, 2, **kw),
    lambda **kw: AgentAttention(16, 2, pretrain_grid=(5, 5), agent_num=4,
                                agent_shape=(2, 2), **kw),
],
                         ids=['window', 'spatial-reduction', 'agent'])
def test_qk_scale_is_the_factor_of_the_dot_products(attention):
    x = torch.randn(2, 35, 16)
    default = attention().eval()
    explicit = attention(qk_scale=8**-0.5).eval()
    other = attention(qk_scale=0.5).eval()
    for module in (explicit, other):
        module.load_state_dict(default.state_dict())
    with torch.no_grad():
        expected = default(x, (5, 7))
        torch.testing.assert_close(explicit(x, (5, 7)), expected)
        assert not torch.allclose(other(x, (5, 7)), expected)


@pytest.mark.parametrize('size', [(64, 64), (70, 45)])
def test_swin_absolute_pos_embed_is_added_after_the_patch_embedding(size):
    img = torch.randn(1, 3, *size)
    default = tiny('swin')
    model = _copy_weights(tiny('swin', use_abs_pos_embed=True), default)
    assert 'absolute_pos_embed' not in default.state_dict()
    # mmdet's layout: (1, h*w, C) for the 224-pixel grid at stride 4
    assert model.absolute_pos_embed.shape == (1, 56 * 56, 8)
    assert _differs(model, default, img)
    # resized to any grid: a constant embedding shifts the embedded patches
    with torch.no_grad():
        model.absolute_pos_embed.fill_(0.5)
        default.patch_embed.norm.bias.add_(0.5)
    for out, ref in zip(_outputs(model, img), _outputs(default, img)):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_swin_absolute_pos_embed_trains_and_freezes():
    model = tiny('swin', use_abs_pos_embed=True).train()
    sum(out.sum() for out in model(torch.randn(1, 3, 64, 64))).backward()
    assert model.absolute_pos_embed.grad.abs().sum() > 0
    frozen = tiny('swin', use_abs_pos_embed=True, frozen_stages=0).train()
    assert not frozen.absolute_pos_embed.requires_grad


def _agent_grids(model: nn.Module) -> list:
    """The pre-training grid of each agent attention's row/column biases."""
    return [(m.ah_bias.shape[-2], m.aw_bias.shape[-1])
            for m in model.modules() if isinstance(m, AgentAttention)]


def test_pretrain_img_size_sizes_the_position_grids():
    pvt = tiny('pvt', pretrain_img_size=128)
    assert [getattr(pvt, f'pos_embed{i}').shape[1]
            for i in range(1, 5)] == [32 * 32, 16 * 16, 8 * 8, 4 * 4]
    assert _agent_grids(pvt) == [(32, 32), (16, 16), (4, 4)]
    swin = tiny('swin', pretrain_img_size=(64, 96), use_abs_pos_embed=True)
    assert swin.absolute_pos_embed.shape == (1, 16 * 24, 8)
    assert _agent_grids(swin) == [(16, 24), (8, 12), (4, 6)]
    # the default is the released 224 pixels
    assert _agent_grids(tiny('swin')) == [(56, 56), (28, 28), (14, 14)]
    for model in (pvt, swin):
        for size in ((128, 128), (64, 96), (50, 70)):
            assert len(_outputs(model, torch.randn(1, 3, *size))) == 4


def test_pvt_num_layers_is_depths():
    model = tiny('pvt', depths=None, num_layers=[1, 2, 1, 1])
    assert [len(getattr(model, f'block{i}'))
            for i in range(1, 5)] == [1, 2, 1, 1]
    assert model.depths == [1, 2, 1, 1]
    both = tiny('pvt', depths=[1, 2, 1, 1], num_layers=(1, 2, 1, 1))
    assert both.depths == [1, 2, 1, 1]
    with pytest.raises(ValueError, match=r'depths=\[1, 1, 1, 1\] and '
                       r'num_layers=\[2, 2, 2, 2\] name the same setting'):
        tiny('pvt', num_layers=[2, 2, 2, 2])


def test_pvt_int_embed_dims_are_channels_per_head():
    model = tiny('pvt', embed_dims=4)
    assert model.embed_dims == [4, 8, 8, 16]
    assert [getattr(model, f'patch_embed{i}').proj.out_channels
            for i in range(1, 5)] == [4, 8, 8, 16]
    assert AgentPVT(embed_dims=64).embed_dims == [64, 128, 320, 512]


def test_pvt_without_abs_pos_embed():
    model = tiny(
        'pvt', use_abs_pos_embed=False, frozen_stages=1,
        drop_rate=0.5).train()
    assert not any('pos_embed' in key for key in model.state_dict())
    # as in mmdet's PVT, the dropout belongs to the position embedding
    assert isinstance(model.pos_drop1, nn.Identity)
    outs = model(torch.randn(1, 3, 64, 64))
    assert all(torch.isfinite(out).all() for out in outs)


def test_pvt_norm_after_stage_normalises_each_stage_output():
    default = tiny('pvt')
    model = _copy_weights(tiny('pvt', norm_after_stage=True), default)
    assert {f'norm{i}.weight' for i in range(1, 5)} <= set(model.state_dict())
    assert all(getattr(model, f'norm{i}').eps == 1e-6 for i in range(1, 5))
    for out in _outputs(model, torch.randn(1, 3, 64, 64)):
        per_token = out.flatten(2)
        torch.testing.assert_close(
            per_token.mean(1), torch.zeros_like(per_token[:, 0]), atol=1e-5,
            rtol=0)
    frozen = tiny('pvt', norm_after_stage=True, frozen_stages=1).train()
    assert not frozen.norm1.weight.requires_grad
    assert frozen.norm2.weight.requires_grad


def test_pvt_patch_sizes_set_the_strides():
    model = tiny('pvt', patch_sizes=[2, 2, 2, 2], strides=(2, 2, 2, 2))
    outs = _outputs(model, torch.randn(1, 3, 48, 32))
    assert [out.shape[-2:] for out in outs] == [(24, 16), (12, 8), (6, 4),
                                                (3, 2)]
    assert model.pos_embed1.shape[1] == 112 * 112
    with pytest.raises(ValueError, match='at least 16'):
        model(torch.randn(1, 3, 15, 32))


def test_pvt_num_heads_without_embed_dims_have_64_channels_per_head():
    # mmdet's PVT: embed_dims defaults to 64 channels per head
    model = AgentPVT(num_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1])
    assert model.embed_dims == [64, 128, 256, 512]
    assert [out.shape[1] for out in model(torch.randn(1, 3, 64, 64))
            ] == [64, 128, 256, 512]


def test_pvt_patch_sizes_without_strides_keep_mmdets_strides():
    # mmdet's PVT takes strides (4, 2, 2, 2) when none are given, so these
    # patches would overlap there: an error, not another network
    with pytest.raises(ValueError, match='strides') as error:
        tiny('pvt', patch_sizes=[7, 3, 3, 3])
    assert 'give the same strides' in str(error.value)


def test_swin_patch_size_and_patch_norm():
    model = tiny('swin', patch_size=2, patch_norm=False)
    outs = _outputs(model, torch.randn(1, 3, 32, 48))
    assert [out.shape[-2:] for out in outs] == [(16, 24), (8, 12), (4, 6),
                                                (2, 3)]
    assert not any(
        key.startswith('patch_embed.norm') or '.downsample.norm' in key
        for key in model.state_dict())
    assert model.patch_embed.proj.kernel_size == (2, 2)
    assert 'layers.0.downsample.norm.weight' in tiny('swin').state_dict()


@pytest.mark.parametrize('name', sorted(BACKBONES))
@pytest.mark.parametrize('convert_weights', [False, True])
def test_convert_weights_is_accepted(name, convert_weights):
    model = tiny(name, convert_weights=convert_weights)
    assert model.convert_weights is convert_weights


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_init_cfg_without_type_loads_the_checkpoint(tmp_path, name):
    source = tiny(name)
    path = str(tmp_path / 'weights.pth')
    torch.save(dict(state_dict=source.state_dict()), path)
    torch.manual_seed(1)
    model = tiny(name, init_cfg=dict(checkpoint=path))
    model.init_weights()
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_a_pretrained_entry_of_an_init_cfg_list_loads_the_checkpoint(
        tmp_path, name):
    source = tiny(name)
    path = str(tmp_path / 'weights.pth')
    # the authors' layout, which mmengine's own loader does not read
    torch.save(dict(model=source.state_dict()), path)
    torch.manual_seed(1)
    # the other entries first, then the checkpoint over them
    constant = dict(type='Constant', layer='Linear', val=0.5, bias=0.)
    model = tiny(name, init_cfg=[constant,
                                 dict(type='Pretrained', checkpoint=path)])
    model.init_weights()
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize('backbone, alias, arch', [
    (AgentPVT, 't', 'tiny'),
    (AgentPVT, 's', 'small'),
    (AgentPVT, 'm', 'medium'),
    (AgentPVT, 'l', 'large'),
    (AgentSwinTransformer, 't', 'tiny'),
    (AgentSwinTransformer, 's', 'small'),
    (AgentSwinTransformer, 'b', 'base'),
])
def test_arch_initials(backbone, alias, arch):
    assert backbone(arch=alias).arch_settings == backbone(
        arch=arch).arch_settings


@pytest.mark.parametrize('backbone, alias, initials', [
    (AgentPVT, 'b', "['l', 'm', 's', 't']"),
    (AgentSwinTransformer, 'm', "['b', 's', 't']"),
])
def test_unknown_arch_initial_lists_the_valid_ones(backbone, alias, initials):
    message = rf"arch '{alias}'.*initials {re.escape(initials)}"
    with pytest.raises(ValueError, match=message):
        backbone(arch=alias)


# ----------------------------------------------------------------------
# values that cannot be honoured
REFUSED = [
    ('pvt', 'num_stages', 3, 'four stages'),
    ('pvt', 'num_stages', 5, 'four stages'),
    ('pvt', 'paddings', [3, 1, 1, 1], r'overlapping ones \(PVT v2\)'),
    ('pvt', 'strides', [4, 2, 2, 1], r'non-overlapping'),
    ('pvt', 'strides', [2, 2, 2, 2], r'non-overlapping'),
    ('pvt', 'use_conv_ffn', True, r'convolutional FFN \(PVT v2\)'),
    ('pvt', 'use_conv_ffn', 1, 'Give a bool'),
    ('pvt', 'use_abs_pos_embed', 'yes', 'Give a bool'),
    ('pvt', 'norm_after_stage', None, 'Give a bool'),
    ('pvt', 'embed_dims', 0, 'channels per head'),
    ('pvt', 'embed_dims', True, 'channels per head'),
    ('swin', 'strides', (4, 2, 2, 1), 'merges 2x2 patches'),
    ('swin', 'strides', (2, 2, 2, 2), 'first stride is the patch size'),
    ('swin', 'patch_size', 0, 'released models use 4'),
    ('swin', 'patch_norm', None, 'Give a bool'),
    ('swin', 'use_abs_pos_embed', 'no', 'Give a bool'),
]
# (argument, value, fix) refused by both backbones
REFUSED_BY_BOTH = [
    ('qk_scale', 0, r'head_dims \*\* -0.5'),
    ('qk_scale', -1., r'head_dims \*\* -0.5'),
    ('pretrain_img_size', 16, 'side of the pre-training images'),
    ('pretrain_img_size', (224, 224, 3), 'side of the pre-training images'),
    ('norm_cfg', 'LN', 'type'),
    ('norm_cfg', dict(type='BN'), 'BatchNorm2d normalises axis 1'),
    ('norm_cfg', dict(type='GN', num_groups=1), 'GroupNorm normalises'),
    ('norm_cfg', dict(type='NoSuchNorm'), 'Building it failed'),
    ('act_cfg', dict(type='NoSuchActivation'), 'Building it failed'),
    ('act_cfg', dict(inplace=True), 'type'),
    ('convert_weights', 'yes', 'Give a bool'),
    ('channels_last_outputs', 1, 'Give a bool'),
]


@pytest.mark.parametrize('name, arg, value, fix', REFUSED + [
    (name, *case) for case in REFUSED_BY_BOTH for name in sorted(BACKBONES)
])
def test_refused_value_is_a_value_error_naming_it(name, arg, value, fix):
    with pytest.raises(ValueError, match=error_message(arg, value)) as error:
        tiny(name, **{arg: value})
    assert error.match(fix)
    assert str(error.value).startswith(BACKBONES[name].__name__)
