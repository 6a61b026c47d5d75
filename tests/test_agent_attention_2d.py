"""AgentAttention2d: the plug-in's equations, layouts and settings, and the
models of ``configs/agent_plugin`` (build, one training step, one
prediction), on a randomly initialised ResNet (no checkpoint is read)."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from backbone_checks import error_message
from mm_models import one_thread  # noqa: F401  (autouse: 1 thread)
from mm_models import IMAGE_SIZE, build_model, det_batch, seg_batch
from mmcv.cnn import build_plugin_layer
from mmdet.registry import MODELS as DET_MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope
from reference_agent import ReferenceAgentAttention, randomize_
from torch import Tensor

from agent_mm.models import AgentAttention2d

REPO = Path(__file__).resolve().parents[1]
PLUGIN_CONFIGS = sorted((REPO / 'configs' / 'agent_plugin').glob('*.py'))
SETTINGS = dict(
    in_channels=32,
    num_heads=2,
    agent_num=9,
    agent_shape=(4, 5),
    pretrain_grid=(6, 6))
# bottlenecks of a ResNet-50 in stages c3, c4, c5
PLUGGED_BLOCKS = dict(layer2=4, layer3=6, layer4=3)


class LiteralPlugin(nn.Module):
    """``x + gamma * attn(LayerNorm(x))`` on a ``(B, C, H, W)`` map,
    written out with the spec's literal agent attention; parameter names
    are those of :class:`AgentAttention2d`."""

    def __init__(self, in_channels, num_heads, agent_num, agent_shape,
                 pretrain_grid):
        super().__init__()
        self.norm = nn.LayerNorm(in_channels, eps=1e-6)
        self.attn = ReferenceAgentAttention(
            in_channels,
            num_heads,
            agent_num,
            agent_shape,
            pretrain_grid,
            fused_qkv=True)
        self.gamma = nn.Parameter(torch.zeros(in_channels))

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        tokens = x.reshape(batch, channels, height * width).transpose(1, 2)
        branch = self.attn(self.norm(tokens), height, width)
        branch = branch.transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.gamma.reshape(channels, 1, 1) * branch


def _pair(**kwargs):
    """An AgentAttention2d and the literal plug-in with the same random
    parameters (``gamma`` included, so the branch counts)."""
    literal = LiteralPlugin(**SETTINGS)
    randomize_(literal, seed=1)
    module = AgentAttention2d(**SETTINGS, **kwargs)
    module.load_state_dict(literal.state_dict(), strict=True)
    return module, literal


@pytest.mark.parametrize('hw', [(1, 1), (3, 5), (13, 17), (6, 6)])
def test_matches_literal_equations(hw):
    module, literal = _pair()
    module.eval()
    x = torch.randn(2, 32, *hw)
    with torch.no_grad():
        out = module(x)
        expected = literal(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize('hw', [(3, 5), (13, 17)])
def test_training_gradients_match_literal_equations(hw):
    module, literal = _pair()
    x = torch.randn(2, 32, *hw)
    grads = []
    for model in (module.train(), literal):
        x_in = x.clone().requires_grad_()
        (model(x_in)**2).sum().backward()
        grads.append((x_in.grad, {
            name: param.grad
            for name, param in model.named_parameters()
        }))
    (x_grad, param_grads), (x_expected, param_expected) = grads
    torch.testing.assert_close(x_grad, x_expected, atol=1e-4, rtol=1e-4)
    assert param_grads.keys() == param_expected.keys()
    for name, grad in param_grads.items():
        torch.testing.assert_close(
            grad, param_expected[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize('training', [False, True])
def test_nhwc_input_gives_the_nchw_result(training):
    nchw, _ = _pair()
    nhwc = AgentAttention2d(**SETTINGS, data_format='NHWC')
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.randn(2, 32, 13, 17)
    with torch.set_grad_enabled(training):
        expected = nchw.train(training)(x).permute(0, 2, 3, 1)
        out = nhwc.train(training)(x.permute(0, 2, 3, 1).contiguous())
    assert out.shape == (2, 13, 17, 32)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize('data_format', ['NCHW', 'NHWC'])
def test_starts_as_the_identity(data_format):
    module = AgentAttention2d(64, data_format=data_format)
    x = torch.randn((2, 64, 9, 11) if data_format == 'NCHW' else (2, 9, 11,
                                                                  64))
    assert torch.equal(module(x), x)


@pytest.mark.parametrize('channels, heads', [(128, 2), (256, 4), (512, 8),
                                             (96, 1), (200, 2), (8, 1)])
def test_build_plugin_layer(channels, heads):
    name, layer = build_plugin_layer(
        dict(type='AgentAttention2d', agent_shape=(3, 3)),
        postfix='_1',
        in_channels=channels)
    assert name == 'agent_attention_block_1'
    assert isinstance(layer, AgentAttention2d)
    assert (layer.in_channels, layer.attn.num_heads) == (channels, heads)
    x = torch.randn(1, channels, 5, 3)
    assert layer(x).shape == x.shape


@pytest.mark.parametrize('kwargs, argument', [
    (dict(in_channels=0), 'in_channels'),
    (dict(in_channels=True), 'in_channels'),
    (dict(in_channels=32.), 'in_channels'),
    (dict(num_heads=3), 'num_heads'),
    (dict(agent_num=10), 'agent_num'),
    (dict(layer_scale_init_value=float('nan')), 'layer_scale_init_value'),
    (dict(layer_scale_init_value='0'), 'layer_scale_init_value'),
    (dict(data_format='NWHC'), 'data_format'),
])
def test_invalid_settings_name_the_argument(kwargs, argument):
    settings = dict(SETTINGS, **kwargs)
    with pytest.raises(ValueError,
                       match=error_message(argument, kwargs[argument])):
        AgentAttention2d(**settings)


@pytest.mark.parametrize('data_format, shape', [('NCHW', (2, 32, 7)),
                                                ('NCHW', (2, 7, 9, 32)),
                                                ('NHWC', (2, 32, 7, 9))])
def test_wrong_input_shape_is_an_error(data_format, shape):
    module = AgentAttention2d(32, data_format=data_format)
    with pytest.raises(ValueError, match=f'data_format={data_format!r}'):
        module(torch.randn(shape))


def _build(config: Path) -> nn.Module:
    """The config's model as constructed (no weights read), after checking
    that it imports agent_mm as a user's config would."""
    cfg = Config.fromfile(str(config))
    assert cfg.custom_imports == dict(
        imports=['agent_mm'], allow_failed_imports=False)
    return build_model(cfg)


def _plugins(backbone: nn.Module) -> dict:
    """The AgentAttention2d modules of a backbone, by name."""
    return {
        name: module
        for name, module in backbone.named_modules()
        if isinstance(module, AgentAttention2d)
    }


def _batch(model: nn.Module, with_gt: bool) -> dict:
    """A fake batch for the model's task (two images to train a
    segmentor, one otherwise)."""
    if hasattr(model, 'decode_head'):
        return seg_batch(IMAGE_SIZE, 2 if with_gt else 1,
                         model.decode_head.num_classes)
    return det_batch(IMAGE_SIZE, with_gt, hasattr(model, 'roi_head'))


@pytest.mark.parametrize('config', PLUGIN_CONFIGS, ids=lambda p: p.stem)
def test_config_trains_and_predicts(config):
    model = _build(config)
    plugins = _plugins(model.backbone)
    assert {name.split('.')[0] for name in plugins} == set(PLUGGED_BLOCKS)
    assert len(plugins) == sum(PLUGGED_BLOCKS.values())
    assert all(
        name.endswith('.agent_attention_block') and not module.gamma.any()
        for name, module in plugins.items())

    model.train()
    data = model.data_preprocessor(_batch(model, True), True)
    loss, _ = model.parse_losses(
        model.loss(data['inputs'], data['data_samples']))
    assert torch.isfinite(loss)
    loss.backward()
    # gamma starts at 0: the first step moves it (the branch follows)
    assert all(module.gamma.grad.abs().sum() > 0
               for module in plugins.values())

    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(_batch(model, False), False)
        results = model.predict(data['inputs'], data['data_samples'])
    assert len(results) == 1
    if 'pred_sem_seg' in results[0]:
        assert results[0].pred_sem_seg.shape == (IMAGE_SIZE, IMAGE_SIZE)
    else:
        assert torch.isfinite(results[0].pred_instances.bboxes).all()


def test_plain_resnet_weights_give_the_plain_resnet():
    cfg = Config.fromfile(
        str(REPO / 'configs' / 'agent_plugin' /
            'retinanet_r50-agent-c3-c5_fpn_1x_coco.py'))
    init_default_scope(cfg.default_scope)
    backbone = dict(cfg.model.backbone, init_cfg=None)
    plugged = DET_MODELS.build(backbone)
    plain = DET_MODELS.build(dict(backbone, plugins=None))
    # the ResNet's own initialisation leaves gamma at 0
    plugged.init_weights()
    missing, unexpected = plugged.load_state_dict(
        plain.state_dict(), strict=False)
    assert not unexpected
    assert missing and all('.agent_attention_block.' in key for key in missing)
    plugged.eval()
    plain.eval()
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        for out, expected in zip(plugged(x), plain(x), strict=True):
            assert torch.equal(out, expected)
