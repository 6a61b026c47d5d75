"""The paper's configs: recipes, and one train/predict step of each model.

Every config under ``configs/agent_pvt`` and ``configs/agent_swin`` is loaded
and checked against the recipes of the paper (``paper-results.md``) and the
per-detector backbone settings; then its model is built on the CPU with a
randomly initialised backbone (the ImageNet checkpoints are never read), run
through one loss + backward step and one prediction on a tiny input.
"""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mmdet.registry import MODELS as DET_MODELS
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmengine.config import Config
from mmengine.dataset import Compose
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData, PixelData
from mmseg.registry import MODELS as SEG_MODELS
from mmseg.structures import SegDataSample

import agent_mm  # noqa: F401  (registers the backbones)

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIRS = ('agent_pvt', 'agent_swin')

EXPECTED_CONFIGS = {
    *(f'agent_pvt/{name}' for k in 'tsml'
      for name in (f'mask-rcnn_agent-pvt-{k}_fpn_1x_coco.py',
                   f'retinanet_agent-pvt-{k}_fpn_1x_coco.py',
                   f'fpn_agent-pvt-{k}_8xb2-40k_ade20k-512x512.py')),
    *(f'agent_swin/mask-rcnn_agent-swin-{k}_fpn_ms-crop-{s}_coco.py'
      for k in 'ts' for s in ('1x', '3x')),
    'agent_swin/cascade-mask-rcnn_agent-swin-t_fpn_ms-crop-1x_coco.py',
    *(f'agent_swin/cascade-mask-rcnn_agent-swin-{k}_fpn_ms-crop-3x_coco.py'
      for k in 'tsb'),
    *(f'agent_swin/upernet_agent-swin-{k}_8xb2-160k_ade20k-512x512.py'
      for k in 'tsb'),
}
CONFIGS = sorted(
    str(path.relative_to(REPO / 'configs')) for folder in CONFIG_DIRS
    for path in (REPO / 'configs' / folder).glob('*.py'))

# side of the fake images: every stage keeps a token grid of at least 2x2
IMAGE_SIZE = 64
BACKBONES = dict(pvt='AgentPVT', swin='AgentSwinTransformer')
ARCHS = dict(t='tiny', s='small', m='medium', l='large', b='base')
STAGE_CHANNELS = dict(
    pvt=dict.fromkeys('tsml', [64, 128, 320, 512]),
    swin=dict(
        t=[96, 192, 384, 768], s=[96, 192, 384, 768], b=[128, 256, 512, 1024]))
# stochastic depth per (backbone, method, size), from agent-backbones.md
DROP_PATH = {
    ('pvt', 'mask-rcnn'): dict(t=0.1, s=0.2, m=0.1, l=0.2),
    ('pvt', 'retinanet'): dict(t=0.1, s=0.1, m=0.2, l=0.3),
    ('pvt', 'fpn'): dict(t=0.1, s=0.1, m=0.2, l=0.1),
    ('swin', 'mask-rcnn'): dict(t=0.1, s=0.1),
    ('swin', 'cascade-mask-rcnn'): dict(t=0.1, s=0.1, b=0.4),
    ('swin', 'upernet'): dict(t=0.3, s=0.3, b=0.5),
}
# optimiser per (backbone, method), from paper-results.md
OPTIMIZERS = {
    ('pvt', 'mask-rcnn'): dict(lr=2e-4, weight_decay=1e-4),
    ('pvt', 'retinanet'): dict(lr=1e-4, weight_decay=1e-4),
    ('pvt', 'fpn'): dict(lr=2e-4, weight_decay=1e-4),
    ('swin', 'mask-rcnn'): dict(lr=1e-4, weight_decay=0.05),
    ('swin', 'cascade-mask-rcnn'): dict(lr=1e-4, weight_decay=0.05),
    ('swin', 'upernet'): dict(lr=6e-5, weight_decay=0.01),
}
AGENT_BIASES = ('an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias',
                'wa_bias')
SWIN_NO_DECAY = ('relative_position_bias_table', 'norm', *AGENT_BIASES)
MS_SCALES = [(short, 1333) for short in range(480, 801, 32)]
CASCADE_STDS = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1],
                [0.033, 0.033, 0.067, 0.067]]


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny tensors: threads cost more than they save (3x on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _parse(config: str) -> dict:
    """Backbone family, method, size letter and schedule of a config."""
    name = Path(config).stem
    family, size = re.search(r'agent-(pvt|swin)-([tsmlb])_', name).groups()
    schedule = re.search(r'(1x|3x|40k|160k)', name).group(1)
    return dict(
        name=name,
        family=family,
        method=name.split('_')[0],
        size=size,
        schedule=schedule,
        task='seg' if name.endswith('ade20k-512x512') else 'det')


def _load(config: str) -> Config:
    return Config.fromfile(str(REPO / 'configs' / config))


def _flatten(pipeline: list):
    """All transforms of a pipeline, including nested RandomChoice ones."""
    for transform in pipeline:
        yield transform
        for branch in transform.get('transforms', []):
            yield from _flatten(branch)


def test_expected_configs_exist():
    assert set(CONFIGS) == EXPECTED_CONFIGS


@pytest.mark.parametrize('config', CONFIGS)
def test_config_recipe(config):
    info = _parse(config)
    family, method, size = info['family'], info['method'], info['size']
    cfg = _load(config)

    assert cfg.custom_imports == dict(
        imports=['agent_mm'], allow_failed_imports=False)
    assert cfg.default_scope == ('mmseg' if info['task'] == 'seg' else 'mmdet')

    # backbone: the arch preset plus the per-detector stochastic depth
    backbone = cfg.model.backbone
    assert backbone.type == BACKBONES[family]
    assert backbone.arch == ARCHS[size]
    assert backbone.drop_path_rate == DROP_PATH[family, method][size]
    assert tuple(backbone.out_indices) == (0, 1, 2, 3)
    checkpoint = f'data/agent_{family}_{size}_max_acc.pth'
    assert cfg.checkpoint_file == checkpoint
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=checkpoint)
    if info['name'].startswith('upernet_agent-swin-s'):
        assert [tuple(s) for s in backbone.agent_shapes] == [(9, 9), (12, 12),
                                                             (7, 7), (7, 7)]
    else:
        assert 'agent_shapes' not in backbone
    channels = STAGE_CHANNELS[family][size]
    if method == 'upernet':
        assert cfg.model.decode_head.in_channels == channels
        aux = cfg.model.auxiliary_head
        assert (aux.type, aux.in_index, aux.in_channels) == ('FCNHead', 2,
                                                             channels[2])
        assert aux.loss_decode.loss_weight == 0.4
    else:
        assert cfg.model.neck.in_channels == channels

    # 8 GPUs x 2 images
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=16)

    # optimiser
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    optimizer = cfg.optim_wrapper.optimizer
    assert optimizer.type == 'AdamW'
    expected = OPTIMIZERS[family, method]
    assert optimizer.lr == pytest.approx(expected['lr'])
    assert optimizer.weight_decay == pytest.approx(expected['weight_decay'])
    if family == 'swin':
        assert tuple(optimizer.betas) == (0.9, 0.999)
        custom_keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
        assert set(custom_keys) == set(SWIN_NO_DECAY)
        assert all(v == dict(decay_mult=0.) for v in custom_keys.values())
    else:
        assert 'paramwise_cfg' not in cfg.optim_wrapper

    # schedule
    schedulers = {s.type: s for s in cfg.param_scheduler}
    if info['task'] == 'det':
        epochs = dict(zip(('1x', '3x'), (12, 36)))[info['schedule']]
        assert cfg.train_cfg.max_epochs == epochs
        step = schedulers['MultiStepLR']
        assert step.milestones == ([8, 11] if epochs == 12 else [27, 33])
        assert (step.gamma, step.end, step.by_epoch) == (0.1, epochs, True)
        assert set(schedulers) == {'LinearLR', 'MultiStepLR'}
    else:
        iters = dict(zip(('40k', '160k'), (40000, 160000)))[info['schedule']]
        assert cfg.train_cfg.max_iters == iters
        poly = schedulers['PolyLR']
        assert (poly.eta_min, poly.end, poly.by_epoch) == (0.0, iters, False)
        if family == 'pvt':
            assert set(schedulers) == {'PolyLR'}
            assert (poly.power, poly.begin) == (0.9, 0)
        else:
            warmup = schedulers['LinearLR']
            assert warmup.start_factor == 1e-6
            assert (warmup.begin, warmup.end) == (0, 1500)
            assert (poly.power, poly.begin) == (1.0, 1500)

    # checkpoints: saved atomically, every epoch (det) or every tenth of the
    # iterations (seg) as in mmdet's and mmseg's bases, none removed
    checkpoint = cfg.default_hooks.checkpoint
    assert checkpoint.type == 'AtomicCheckpointHook'
    assert 'max_keep_ckpts' not in checkpoint
    if info['task'] == 'det':
        assert checkpoint.interval == 1 and 'by_epoch' not in checkpoint
    else:
        assert (checkpoint.by_epoch,
                checkpoint.interval) == (False, cfg.train_cfg.max_iters // 10)

    # data: the pipelines build, and follow the recipe
    init_default_scope(cfg.default_scope)
    Compose(cfg.train_dataloader.dataset.pipeline)
    Compose(cfg.test_dataloader.dataset.pipeline)
    transforms = list(_flatten(cfg.train_dataloader.dataset.pipeline))
    types = [t.type for t in transforms]
    if info['task'] == 'seg':
        assert cfg.model.decode_head.num_classes == 150
        assert cfg.model.data_preprocessor.size == (512, 512)
        assert cfg.train_dataloader.dataset.type == 'ADE20KDataset'
        crop = transforms[types.index('RandomCrop')]
        assert crop.crop_size == (512, 512)
    elif family == 'swin':
        # DETR-style: flip, then multi-scale resize or resize-crop-resize
        assert types[2:] == [
            'RandomFlip', 'RandomChoice', 'RandomChoiceResize',
            'RandomChoiceResize', 'RandomCrop', 'RandomChoiceResize',
            'PackDetInputs'
        ]
        choice = transforms[3]
        assert choice.transforms[0][0].scales == MS_SCALES
        short, crop, resize = choice.transforms[1]
        assert short.scales == [(400, 1333), (500, 1333), (600, 1333)]
        assert crop.crop_type == 'absolute_range'
        assert crop.crop_size == (384, 600)
        assert resize.scales == MS_SCALES
    else:
        resize = transforms[types.index('Resize')]
        assert (resize.scale, resize.keep_ratio) == ((1333, 800), True)
        assert transforms[types.index('RandomFlip')].prob == 0.5

    if method == 'cascade-mask-rcnn':
        roi_head = cfg.model.roi_head
        assert roi_head.type == 'CascadeRoIHead'
        for bbox_head, stds in zip(
                roi_head.bbox_head, CASCADE_STDS, strict=True):
            assert bbox_head.type == 'ConvFCBBoxHead'
            assert (bbox_head.num_shared_convs,
                    bbox_head.num_shared_fcs) == (4, 1)
            assert bbox_head.loss_bbox.type == 'GIoULoss'
            assert bbox_head.reg_decoded_bbox
            assert bbox_head.norm_cfg.type == 'SyncBN'
            assert bbox_head.bbox_coder.target_stds == stds


def _det_batch(size: int, with_gt: bool, with_mask: bool) -> dict:
    sample = DetDataSample(
        metainfo=dict(
            img_shape=(size, size),
            ori_shape=(size, size),
            scale_factor=(1., 1.)))
    if with_gt:
        boxes = [[4, 6, 40, 44], [20, 10, 60, 58]]
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor(boxes, dtype=torch.float32),
            labels=torch.tensor([1, 5]))
        if with_mask:
            masks = np.zeros((len(boxes), size, size), dtype=np.uint8)
            for mask, (x1, y1, x2, y2) in zip(masks, boxes):
                mask[y1:y2, x1:x2] = 1
            sample.gt_instances.masks = BitmapMasks(masks, size, size)
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
    return dict(inputs=[image], data_samples=[sample])


def _seg_batch(size: int, num_images: int, num_classes: int) -> dict:
    inputs, samples = [], []
    for _ in range(num_images):
        sample = SegDataSample(
            metainfo=dict(
                img_shape=(size, size),
                ori_shape=(size, size),
                pad_shape=(size, size)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, num_classes, (1, size, size)))
        inputs.append(
            torch.randint(0, 256, (3, size, size), dtype=torch.uint8))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _fewer_rois(model: Config) -> None:
    """Fewer proposals and sampled RoIs: cheaper R-CNN heads, same code."""
    if 'rpn_proposal' not in model.train_cfg:
        return
    model.train_cfg.rpn_proposal.max_per_img = 32
    model.test_cfg.rpn.max_per_img = 32
    rcnn = model.train_cfg.rcnn
    for stage in rcnn if isinstance(rcnn, list) else [rcnn]:
        stage.sampler.num = 16


@pytest.mark.parametrize('config', CONFIGS)
def test_model_trains_and_predicts(config):
    info = _parse(config)
    size = IMAGE_SIZE
    cfg = _load(config)
    init_default_scope(cfg.default_scope)
    if info['task'] == 'seg':
        registry = SEG_MODELS
        cfg.model.data_preprocessor.size = (size, size)
    else:
        registry = DET_MODELS
        _fewer_rois(cfg.model)
    cfg.model.backbone.init_cfg = None

    model = revert_sync_batchnorm(registry.build(cfg.model))
    assert type(model.backbone).__name__ == BACKBONES[info['family']]

    # the no-decay keys reach the backbone's real parameter names
    optimizer = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    weight_decay = {
        id(param): group['weight_decay']
        for group in optimizer.param_groups
        for param in group['params']
    }
    base_wd = cfg.optim_wrapper.optimizer.weight_decay
    named = dict(model.named_parameters())
    for bias in AGENT_BIASES:
        assert any(name.endswith(bias) for name in named), bias
    for name, param in named.items():
        no_decay = info['family'] == 'swin' and any(key in name
                                                    for key in SWIN_NO_DECAY)
        assert weight_decay[id(param)] == (0. if no_decay else base_wd), name

    # one training step
    if info['task'] == 'seg':
        # two images: UPerNet's 1x1 pooling branch needs a batch for BN
        batch = _seg_batch(size, 2, cfg.model.decode_head.num_classes)
    else:
        batch = _det_batch(size, True, 'mask' in info['method'])
    model.train()
    data = model.data_preprocessor(batch, True)
    losses = model.loss(data['inputs'], data['data_samples'])
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    # one prediction
    model.eval()
    if info['task'] == 'seg':
        batch = _seg_batch(size, 1, cfg.model.decode_head.num_classes)
    else:
        batch = _det_batch(size, False, False)
    with torch.no_grad():
        data = model.data_preprocessor(batch, False)
        results = model.predict(data['inputs'], data['data_samples'])
    assert len(results) == 1
    if info['task'] == 'seg':
        assert results[0].pred_sem_seg.data.shape == (1, size, size)
    else:
        pred = results[0].pred_instances
        assert pred.bboxes.shape[1] == 4
        assert torch.isfinite(pred.bboxes).all()
        if 'mask' in info['method']:
            assert pred.masks.shape[1:] == (size, size)


def test_metafiles_cover_every_config():
    index = yaml.safe_load((REPO / 'model-index.yml').read_text())
    assert sorted(index['Import']) == [
        f'configs/{folder}/metafile.yml' for folder in CONFIG_DIRS
    ]
    listed = set()
    for metafile in index['Import']:
        meta = yaml.safe_load((REPO / metafile).read_text())
        collections = {c['Name'] for c in meta['Collections']}
        for model in meta['Models']:
            info = _parse(model['Config'])
            assert model['In Collection'] in collections
            assert model['Name'] == info['name']
            assert (REPO / model['Config']).is_file()
            seg = info['task'] == 'seg'
            metadata = model['Metadata']
            assert metadata['Training Data'] == ('ADE20K' if seg else 'COCO')
            assert ('Iterations' if seg else 'Epochs') in metadata
            assert metadata['Pretrained Weights'] == (
                f'agent_{info["family"]}_{info["size"]}_max_acc.pth')
            assert metadata['FLOPs'] > 0 and metadata['Parameters'] > 0
            metrics = {
                key
                for result in model['Results']
                for key in result['Metrics']
            }
            if seg:
                assert metrics == {'mIoU', 'mAcc'}
            elif info['method'] == 'retinanet':
                assert metrics == {'box AP'}
            else:
                assert metrics == {'box AP', 'mask AP'}
            listed.add(model['Config'])
    assert listed == {f'configs/{config}' for config in EXPECTED_CONFIGS}
