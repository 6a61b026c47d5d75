"""FeatureAutocastHook and tools/test.py --amp: the backbone and neck run in
bfloat16, the heads (and mmcv's float32-only CPU ops) get float32."""
import os.path as osp
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.registry import init_default_scope
from tiny_configs import (DET_CONFIG, DET_OVERRIDES, REPO, SEG_CONFIG,
                          SEG_OVERRIDES, tiny_config)

import agent_mm  # noqa: F401  (registers the hook)
from agent_mm.engine import optim_wrapper
from agent_mm.engine.feature_autocast import (FeatureAutocastHook,
                                              autocast_features,
                                              autocast_method, scales_loss)
from agent_mm.engine.optim_wrapper import CPUAmpOptimWrapper

sys.path.insert(0, osp.join(REPO, 'tools'))
import test as test_tool  # noqa: E402


class _Detector(nn.Module):
    """extract_feat → head, as mmdet / mmseg models are split."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.head = nn.Sequential(nn.Linear(4, 2))

    def extract_feat(self, x):
        return (self.backbone(x), )

    def forward(self, x):
        return self.head(self.extract_feat(x)[0])


def _first_tensor(value):
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


def _record_dtypes(*modules):
    """(input dtype, output dtype) of every call of ``modules``."""
    seen = []
    for module in modules:
        module.register_forward_hook(lambda m, args, out: seen.append(
            (_first_tensor(args).dtype, _first_tensor(out).dtype)))
    return seen


def test_extract_feat_runs_in_bfloat16_and_returns_float32():
    model = _Detector()
    seen = _record_dtypes(model.backbone, model.head)
    autocast_features(model, torch.bfloat16)
    autocast_features(model, torch.bfloat16)  # idempotent
    out = model(torch.randn(3, 4))
    backbone_io, head_io = seen
    assert backbone_io[1] == torch.bfloat16
    assert head_io == (torch.float32, torch.float32)
    assert out.dtype == torch.float32
    # gradients flow through the autocast region
    out.sum().backward()
    assert model.backbone.weight.grad is not None


def test_named_heads_run_in_bfloat16_and_return_float32(monkeypatch):
    monkeypatch.setattr(optim_wrapper, 'cpu_has_native', lambda dtype: True)
    model = _Detector()
    seen = _record_dtypes(model.head[0])
    hook = FeatureAutocastHook(native_only=True, heads=('head', ))
    hook.before_train(_Runner(model))
    hook.before_val(_Runner(model))  # applied again: no second wrapper
    out = model(torch.randn(3, 4))
    assert seen == [(torch.float32, torch.bfloat16)]
    assert out.dtype == torch.float32
    out.sum().backward()
    assert model.head[0].weight.grad is not None


def test_a_new_precision_replaces_the_old_one():
    model = _Detector()
    seen = _record_dtypes(model.head[0])
    autocast_method(model.head, 'forward', torch.bfloat16)
    autocast_method(model.head, 'forward', torch.float16)
    model(torch.randn(3, 4))
    # nested wrappers would leave the inner (bfloat16) autocast in force
    assert seen[0][1] == torch.float16


def test_unknown_heads_are_refused_with_the_model_children():
    hook = FeatureAutocastHook(dtype='bfloat16', heads=('roi_head', ))
    with pytest.raises(ValueError, match="no submodule 'roi_head'.*backbone"):
        hook.before_train(_Runner(_Detector()))


def test_models_without_extract_feat_are_refused():
    with pytest.raises(ValueError, match='extract_feat'):
        autocast_features(nn.Linear(2, 2), torch.bfloat16)
    with pytest.raises(ValueError, match='dtype'):
        FeatureAutocastHook(dtype='float64')


@pytest.mark.parametrize('base, overrides, scope, metric', [
    (DET_CONFIG, DET_OVERRIDES, 'mmdet', 'coco/bbox_mAP'),
    (SEG_CONFIG, SEG_OVERRIDES, 'mmseg', 'mIoU'),
], ids=['detection', 'segmentation'])
def test_test_tool_amp_runs_features_in_bfloat16(
        tmp_path, monkeypatch, base, overrides, scope, metric):
    # the CPU path of --amp, also where a GPU is present
    monkeypatch.setattr(test_tool, 'has_accelerator', lambda: False)
    config = tiny_config(
        tmp_path, base, overrides,
        data='dict(num_train=2, num_val=2, img_size=64, seed=3)')
    init_default_scope(scope)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    model = registry.build(Config.fromfile(config).model)
    checkpoint = str(tmp_path / 'model.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, checkpoint)

    seen = {}
    build_runner = test_tool.build_runner

    def recording_runner(cfg):
        runner = build_runner(cfg)
        inner = runner.model
        # the seg head's predict calls its forward directly: hook its conv
        head = (inner.rpn_head
                if scope == 'mmdet' else inner.decode_head.conv_seg)
        seen['backbone'] = _record_dtypes(inner.backbone.patch_embed1.norm)
        seen['head'] = _record_dtypes(head)
        return runner

    monkeypatch.setattr(test_tool, 'build_runner', recording_runner)
    metrics = test_tool.main([config, checkpoint, '--work-dir',
                              str(tmp_path / 'work'), '--amp'])
    assert metric in metrics
    assert seen['backbone'] and all(
        out == torch.bfloat16 for _, out in seen['backbone'])
    assert seen['head'] and all(
        inp == torch.float32 for inp, _ in seen['head'])


class _Runner:
    """What FeatureAutocastHook reads of a runner."""

    def __init__(self, model):
        self.model = model


@pytest.mark.parametrize('native', [True, False])
def test_native_only_hook_leaves_features_in_float32_without_native(
        monkeypatch, native):
    monkeypatch.setattr(optim_wrapper, 'cpu_has_native',
                        lambda dtype: native)
    model = _Detector()
    seen = _record_dtypes(model.backbone)
    hook = FeatureAutocastHook(native_only=True)
    hook.before_train(_Runner(model))
    model(torch.randn(3, 4))
    assert seen[0][1] == (torch.bfloat16 if native else torch.float32)


def test_a_cuda_hook_does_not_ask_the_cpu(monkeypatch):
    asked = []
    monkeypatch.setattr(optim_wrapper, 'cpu_has_native',
                        lambda dtype: asked.append(dtype) or False)
    hook = FeatureAutocastHook(device_type='cuda', native_only=True)
    # native_only concerns the CPU: a GPU hook keeps its dtype
    assert hook.dtype == torch.bfloat16 and not asked


def test_float32_hook_leaves_features_in_float32(monkeypatch):
    monkeypatch.setattr(optim_wrapper, 'cpu_has_native', lambda dtype: True)
    model = _Detector()
    seen = _record_dtypes(model.backbone)
    FeatureAutocastHook(dtype='float32').before_train(_Runner(model))
    model(torch.randn(3, 4))
    assert seen[0][1] == torch.float32


def test_float16_training_needs_an_optim_wrapper_that_scales_the_loss():
    model = nn.Linear(2, 2)
    plain = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    scaling, bfloat16 = (CPUAmpOptimWrapper(
        dtype=dtype, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
                         for dtype in ('float16', 'bfloat16'))
    assert scales_loss(scaling) and scales_loss(OptimWrapperDict(a=scaling))
    assert not scales_loss(plain) and not scales_loss(bfloat16)
    hook = FeatureAutocastHook(dtype='float16')
    with pytest.raises(ValueError, match='does not scale the loss'):
        hook.before_train(SimpleNamespace(optim_wrapper=plain, model=model))
