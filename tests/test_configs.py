"""The shipped configs: what their names say, the paper's recipes, and one
train/predict step of each of the paper's models.

Every config under ``configs/agent_pvt``, ``configs/agent_swin`` and
``configs/agent_plugin`` is loaded and checked against its name (dataset,
crop, schedule length, GPUs x images per GPU), its metafile entry and the
model it builds (the backbone's outputs feed the neck or heads, every
no-decay key matches a parameter, the parameter count); the paper's configs
also against one table of the recipes of ``paper-results.md``. Each paper
model is then built on the CPU with a randomly initialised backbone (the
ImageNet checkpoints are never read) and run through one loss + backward step
and one prediction on a tiny input (the plug-in models in
``test_agent_attention_2d.py``).
"""
import copy
import functools
import re
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
import torch
import yaml
from mm_models import one_thread  # noqa: F401  (autouse: 1 thread)
from mm_models import IMAGE_SIZE, build_model, det_batch, seg_batch
from mmdet.registry import DATASETS as DET_DATASETS
from mmengine.config import Config
from mmengine.dataset import Compose
from mmengine.optim import build_optim_wrapper
from mmengine.registry import HOOKS, init_default_scope
from mmseg.registry import DATASETS as SEG_DATASETS

import agent_mm  # noqa: F401  (registers the backbones)

REPO = Path(__file__).resolve().parents[1]


def _configs(*folders: str) -> list:
    """The configs of ``configs/<folder>``, as paths under ``configs/``."""
    return sorted(
        str(path.relative_to(REPO / 'configs')) for folder in folders
        for path in (REPO / 'configs' / folder).glob('*.py'))


PAPER_CONFIGS = _configs('agent_pvt', 'agent_swin')
CONFIGS = PAPER_CONFIGS + _configs('agent_plugin')

# mmdet's and mmseg's config names: {method}_{backbone}_[{misc}_]
# [{gpus}xb{images per GPU}-]{schedule}_{dataset}[-{crop}], 8xb2 if not said
NAME = re.compile(r'(?P<method>[^_]+)_(?P<backbone>[^_]+)_.*?'
                  r'(?:(?P<gpus>\d+)xb(?P<per_gpu>\d+)-)?'
                  r'(?P<schedule>(?P<count>\d+)(?P<unit>[xk]))_'
                  r'(?P<dataset>[^-_]+)(?:-(?P<crop>\d+)x(?P<crop_w>\d+))?')
PAPER_BACKBONE = re.compile(r'agent-(?P<family>pvt|swin)-(?P<size>[tsmlb])')
# a dataset name: the scope of its configs, its registry and class, its name
# in the metafiles
DATASET_NAMES = dict(
    coco=('mmdet', DET_DATASETS, 'CocoDataset', 'COCO'),
    ade20k=('mmseg', SEG_DATASETS, 'ADE20KDataset', 'ADE20K'))
# a schedule unit: its train loop and the loop's length key, and how many
# epochs or iterations one unit is (1x = 12 epochs, 1k = 1000 iterations)
SCHEDULE_UNITS = dict(
    x=('EpochBasedTrainLoop', 'max_epochs', 12),
    k=('IterBasedTrainLoop', 'max_iters', 1000))
# what the metafiles call an optimiser
TECHNIQUES = dict(AdamW='AdamW', SGD='SGD with Momentum')

BACKBONES = dict(pvt='AgentPVT', swin='AgentSwinTransformer')
ARCHS = dict(t='tiny', s='small', m='medium', l='large', b='base')
AGENT_BIASES = ('an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias',
                'wa_bias')


class Recipe(NamedTuple):
    """What a paper config's name does not say (``agent_shapes``: the arch's
    if None)."""
    optimizer: str
    lr: float
    weight_decay: float
    drop_path_rate: float
    agent_shapes: Optional[list] = None


# The paper's recipe of each config: optimiser, lr and weight decay from
# paper-results.md, stochastic depth and agent shapes from agent-backbones.md
RECIPES = {
    'mask-rcnn_agent-pvt-t_fpn_1x_coco': Recipe('AdamW', 2e-4, 1e-4, 0.1),
    'mask-rcnn_agent-pvt-s_fpn_1x_coco': Recipe('AdamW', 2e-4, 1e-4, 0.2),
    'mask-rcnn_agent-pvt-m_fpn_1x_coco': Recipe('AdamW', 2e-4, 1e-4, 0.1),
    'mask-rcnn_agent-pvt-l_fpn_1x_coco': Recipe('AdamW', 2e-4, 1e-4, 0.2),
    'retinanet_agent-pvt-t_fpn_1x_coco': Recipe('AdamW', 1e-4, 1e-4, 0.1),
    'retinanet_agent-pvt-s_fpn_1x_coco': Recipe('AdamW', 1e-4, 1e-4, 0.1),
    'retinanet_agent-pvt-m_fpn_1x_coco': Recipe('AdamW', 1e-4, 1e-4, 0.2),
    'retinanet_agent-pvt-l_fpn_1x_coco': Recipe('AdamW', 1e-4, 1e-4, 0.3),
    'fpn_agent-pvt-t_8xb2-40k_ade20k-512x512': Recipe(
        'AdamW', 2e-4, 1e-4, 0.1),
    'fpn_agent-pvt-s_8xb2-40k_ade20k-512x512': Recipe(
        'AdamW', 2e-4, 1e-4, 0.1),
    'fpn_agent-pvt-m_8xb2-40k_ade20k-512x512': Recipe(
        'AdamW', 2e-4, 1e-4, 0.2),
    'fpn_agent-pvt-l_8xb2-40k_ade20k-512x512': Recipe(
        'AdamW', 2e-4, 1e-4, 0.1),
    'mask-rcnn_agent-swin-t_fpn_ms-crop-1x_coco': Recipe(
        'AdamW', 1e-4, 0.05, 0.1),
    'mask-rcnn_agent-swin-t_fpn_ms-crop-3x_coco': Recipe(
        'AdamW', 1e-4, 0.05, 0.1),
    'mask-rcnn_agent-swin-s_fpn_ms-crop-1x_coco': Recipe(
        'AdamW', 1e-4, 0.05, 0.1),
    'mask-rcnn_agent-swin-s_fpn_ms-crop-3x_coco': Recipe(
        'AdamW', 1e-4, 0.05, 0.1),
    'cascade-mask-rcnn_agent-swin-t_fpn_4conv1fc-giou_ms-crop-1x_coco': Recipe(
        'AdamW', 1e-4, 0.05, 0.1),
    'cascade-mask-rcnn_agent-swin-t_fpn_4conv1fc-giou_ms-crop-3x_coco': Recipe(
        'AdamW', 1e-4, 0.05, 0.1),
    'cascade-mask-rcnn_agent-swin-s_fpn_4conv1fc-giou_ms-crop-3x_coco': Recipe(
        'AdamW', 1e-4, 0.05, 0.1),
    'cascade-mask-rcnn_agent-swin-b_fpn_4conv1fc-giou_ms-crop-3x_coco': Recipe(
        'AdamW', 1e-4, 0.05, 0.4),
    'upernet_agent-swin-t_8xb2-160k_ade20k-512x512': Recipe(
        'AdamW', 6e-5, 0.01, 0.3),
    'upernet_agent-swin-s_8xb2-160k_ade20k-512x512': Recipe(
        'AdamW', 6e-5, 0.01, 0.3, [(9, 9), (12, 12), (7, 7), (7, 7)]),
    'upernet_agent-swin-b_8xb2-160k_ade20k-512x512': Recipe(
        'AdamW', 6e-5, 0.01, 0.5),
}
# the paper's lr schedulers of each schedule: mmdet's 500-iteration warm-up
# then x0.1 steps at the epochs given; poly decay to 0 (after a warm-up of
# 1500 iterations from 1e-6 for 160k)
LR_SCHEDULERS = {
    '1x': dict(
        LinearLR=dict(start_factor=0.001, end=500),
        MultiStepLR=dict(milestones=[8, 11], gamma=0.1)),
    '3x': dict(
        LinearLR=dict(start_factor=0.001, end=500),
        MultiStepLR=dict(milestones=[27, 33], gamma=0.1)),
    '40k': dict(PolyLR=dict(power=0.9, eta_min=0.0, begin=0)),
    '160k': dict(
        LinearLR=dict(start_factor=1e-6, end=1500),
        PolyLR=dict(power=1.0, eta_min=0.0, begin=1500)),
}
# AdamW's betas in every recipe (torch's default)
BETAS = (0.9, 0.999)
# the paper's parameters without weight decay, by backbone family
NO_DECAY = dict(
    pvt=(), swin=('relative_position_bias_table', 'norm', *AGENT_BIASES))


def _parse(config: str) -> dict:
    """What a config's name says.

    Args:
        config (str): The config's path (only its file name is read).

    Returns:
        dict: ``name``, ``method``, ``dataset``, ``schedule`` (e.g. ``'3x'``),
        ``length`` (epochs or iterations), ``unit`` (``'x'`` or ``'k'``),
        ``batch`` (GPUs, images per GPU), ``crop`` (None if not said), and
        for the paper's backbones ``family`` and ``size`` (else None).
    """
    name = Path(config).stem
    match = NAME.fullmatch(name)
    assert match, f'{name} does not follow the naming convention'
    paper = PAPER_BACKBONE.fullmatch(match['backbone'])
    unit = match['unit']
    return dict(
        name=name,
        method=match['method'],
        dataset=match['dataset'],
        schedule=match['schedule'],
        unit=unit,
        length=int(match['count']) * SCHEDULE_UNITS[unit][2],
        batch=(int(match['gpus'] or 8), int(match['per_gpu'] or 2)),
        crop=match['crop'] and (int(match['crop']), int(match['crop_w'])),
        family=paper and paper['family'],
        size=paper and paper['size'])


@functools.lru_cache(maxsize=None)
def _resolved(config: str) -> Config:
    return Config.fromfile(str(REPO / 'configs' / config))


def _load(config: str) -> Config:
    """The resolved config, a copy to change (each is read from its files
    once: seconds with mmdet's and mmseg's bases)."""
    return copy.deepcopy(_resolved(config))


def _flatten(pipeline: list):
    """All transforms of a pipeline, including nested RandomChoice ones."""
    for transform in pipeline:
        yield transform
        for branch in transform.get('transforms', []):
            yield from _flatten(branch)


def _num_classes(cfg) -> set:
    """Every ``num_classes`` of a nested model config."""
    if isinstance(cfg, list):
        return set().union(*map(_num_classes, cfg))
    if not isinstance(cfg, dict):
        return set()
    found = {cfg['num_classes']} if 'num_classes' in cfg else set()
    return found.union(*map(_num_classes, cfg.values()))


@functools.lru_cache(maxsize=None)
def _metafile_entries() -> dict:
    """The model entries of the metafiles that model-index.yml imports.

    Returns:
        dict: Lists of ``(collection names, model entry)``, by config path
        under ``configs/``.
    """
    entries = {}
    index = yaml.safe_load((REPO / 'model-index.yml').read_text())
    for metafile in index['Import']:
        meta = yaml.safe_load((REPO / metafile).read_text())
        collections = {c['Name'] for c in meta['Collections']}
        for model in meta['Models']:
            config = str(Path(model['Config']).relative_to('configs'))
            entries.setdefault(config, []).append((collections, model))
    return entries


def test_every_paper_config_has_a_recipe():
    assert {Path(config).stem for config in PAPER_CONFIGS} == set(RECIPES)


@pytest.mark.parametrize('config', CONFIGS)
def test_config_agrees_with_its_name(config):
    info = _parse(config)
    cfg = _load(config)
    scope, registry, dataset, _ = DATASET_NAMES[info['dataset']]
    assert cfg.custom_imports == dict(
        imports=['agent_mm'], allow_failed_imports=False)
    assert cfg.default_scope == scope
    init_default_scope(scope)

    # data: the dataset and crop of the name; heads for its classes
    assert cfg.train_dataloader.dataset.type == dataset
    classes = registry.get(dataset).METAINFO['classes']
    assert _num_classes(cfg.model) == {len(classes)}
    Compose(cfg.train_dataloader.dataset.pipeline)
    Compose(cfg.test_dataloader.dataset.pipeline)
    crops = [
        tuple(transform.crop_size)
        for transform in _flatten(cfg.train_dataloader.dataset.pipeline)
        if transform.type == 'RandomCrop'
    ]
    if info['crop']:
        assert crops == [info['crop']]
        assert cfg.model.data_preprocessor.size == info['crop']
    else:
        # mmdet's 'ms-crop': multi-scale resize, or resize-crop-resize
        assert bool(crops) == ('ms-crop' in info['name'])

    # GPUs x images per GPU (mmseg's configs have no auto_scale_lr, ours do)
    gpus, per_gpu = info['batch']
    assert cfg.train_dataloader.batch_size == per_gpu
    if info['family'] or 'auto_scale_lr' in cfg:
        assert cfg.auto_scale_lr.base_batch_size == gpus * per_gpu

    # schedule: 1x = 12 epochs, 40k = 40000 iterations; the lr schedule ends
    # with the training
    loop, length_key, _ = SCHEDULE_UNITS[info['unit']]
    assert cfg.train_cfg.type == loop
    assert cfg.train_cfg[length_key] == info['length']
    last = cfg.param_scheduler[-1]
    assert (last.end, last.by_epoch) == (info['length'], info['unit'] == 'x')

    # checkpoints: saved atomically, one at the end of training, none removed
    checkpoint = cfg.default_hooks.checkpoint
    assert checkpoint.type == 'AtomicCheckpointHook'
    assert checkpoint.get('by_epoch', True) == (info['unit'] == 'x')
    assert info['length'] % checkpoint.interval == 0
    assert 'max_keep_ckpts' not in checkpoint


@pytest.mark.parametrize('config', PAPER_CONFIGS)
def test_paper_recipe(config):
    info = _parse(config)
    family, size = info['family'], info['size']
    recipe = RECIPES[info['name']]
    cfg = _load(config)

    # the arch of the name, from the authors' ImageNet-1K checkpoint
    backbone = cfg.model.backbone
    assert (backbone.type, backbone.arch) == (BACKBONES[family], ARCHS[size])
    assert cfg.checkpoint_file == f'data/agent_{family}_{size}_max_acc.pth'
    assert backbone.init_cfg == dict(
        type='Pretrained', checkpoint=cfg.checkpoint_file)
    assert backbone.drop_path_rate == recipe.drop_path_rate
    assert backbone.get('agent_shapes') == recipe.agent_shapes

    # optimiser (no weight decay where NO_DECAY says: see
    # test_model_fits_its_config), in float32
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    optimizer = cfg.optim_wrapper.optimizer
    assert optimizer.type == recipe.optimizer
    assert (optimizer.lr, optimizer.weight_decay) == pytest.approx(
        (recipe.lr, recipe.weight_decay))
    assert tuple(optimizer.get('betas', BETAS)) == BETAS

    # lr schedule
    schedulers = {s.type: s for s in cfg.param_scheduler}
    expected = LR_SCHEDULERS[info['schedule']]
    assert schedulers.keys() == expected.keys()
    for name, values in expected.items():
        assert {key: schedulers[name][key] for key in values} == values


@pytest.mark.parametrize('config', CONFIGS)
def test_model_fits_its_config(config):
    info = _parse(config)
    cfg = _load(config)
    model = build_model(cfg)

    # the backbone's outputs feed the neck, or the heads without one
    model.eval()
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    channels = [feature.shape[1] for feature in features]
    if 'neck' in cfg.model:
        assert cfg.model.neck.in_channels == channels
    else:
        heads = (cfg.model.decode_head, cfg.model.get('auxiliary_head'))
        for head in filter(None, heads):
            index = head.in_index
            expected = ([channels[i] for i in index]
                        if isinstance(index, list) else channels[index])
            assert head.in_channels == expected

    # every no-decay key is a parameter's (the absolute position embedding's
    # where the backbone has one); the parameters NO_DECAY names get no
    # weight decay (none outside the paper), the others the optimiser's
    names = [name for name, _ in model.named_parameters()]
    paramwise = cfg.optim_wrapper.get('paramwise_cfg', {})
    for key in paramwise.get('custom_keys', {}):
        optional = (key == 'absolute_pos_embed'
                    and not cfg.model.backbone.get('use_abs_pos_embed'))
        assert optional or any(key in name for name in names), key
    optimizer = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    weight_decay = {
        id(param): group['weight_decay']
        for group in optimizer.param_groups
        for param in group['params']
    }
    base_wd = cfg.optim_wrapper.optimizer.weight_decay
    no_decay = NO_DECAY.get(info['family'], ())
    for name, param in model.named_parameters():
        expected = 0. if any(key in name for key in no_decay) else base_wd
        assert weight_decay[id(param)] == expected, name

    # as many parameters as the metafile says (the paper's in millions)
    params = sum(param.numel() for param in model.parameters())
    (_, entry), = _metafile_entries()[config]
    published = entry['Metadata']['Parameters']
    if info['family']:
        assert abs(params - published) < 1e6
    else:
        assert params == published


@pytest.mark.parametrize('config', PAPER_CONFIGS)
def test_model_trains_and_predicts(config):
    info = _parse(config)
    size = IMAGE_SIZE
    cfg = _load(config)
    model = build_model(cfg)
    seg = cfg.default_scope == 'mmseg'

    # one training step
    if seg:
        # two images: UPerNet's 1x1 pooling branch needs a batch for BN
        batch = seg_batch(size, 2, cfg.model.decode_head.num_classes)
    else:
        batch = det_batch(size, True, 'mask' in info['method'])
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
    if seg:
        batch = seg_batch(size, 1, cfg.model.decode_head.num_classes)
    else:
        batch = det_batch(size, False, False)
    with torch.no_grad():
        data = model.data_preprocessor(batch, False)
        results = model.predict(data['inputs'], data['data_samples'])
    assert len(results) == 1
    if seg:
        assert results[0].pred_sem_seg.data.shape == (1, size, size)
    else:
        pred = results[0].pred_instances
        assert pred.bboxes.shape[1] == 4
        assert torch.isfinite(pred.bboxes).all()
        if 'mask' in info['method']:
            assert pred.masks.shape[1:] == (size, size)


def test_metafiles_list_every_config_once():
    index = yaml.safe_load((REPO / 'model-index.yml').read_text())
    assert sorted(index['Import']) == sorted(
        str(path.relative_to(REPO))
        for path in (REPO / 'configs').glob('*/metafile.yml'))
    entries = _metafile_entries()
    assert set(entries) == set(CONFIGS)
    assert all(len(models) == 1 for models in entries.values())


@pytest.mark.parametrize('config', CONFIGS)
def test_metafile_entry(config):
    info = _parse(config)
    cfg = _load(config)
    (collections, entry), = _metafile_entries()[config]
    assert entry['Name'] == info['name']
    assert entry['In Collection'] in collections

    metadata = entry['Metadata']
    gpus, per_gpu = info['batch']
    assert metadata['Training Data'] == DATASET_NAMES[info['dataset']][3]
    assert metadata['Batch Size'] == gpus * per_gpu
    resources = f'{gpus}x GPUs'
    assert metadata.get('Training Resources', resources) == resources
    assert metadata['Epochs' if info['unit'] == 'x' else 'Iterations'] == (
        info['length'])
    assert TECHNIQUES[cfg.optim_wrapper.optimizer.type] in (
        metadata['Training Techniques'])
    # the paper's checkpoints are expected under data/
    weights = metadata['Pretrained Weights']
    model = cfg.model
    source = model.get('pretrained') or model.backbone.init_cfg.checkpoint
    assert source in (weights, f'data/{weights}')
    assert metadata['FLOPs'] > 0 and metadata['Parameters'] > 0

    # the paper's published results; none for the configs not trained
    if not info['family']:
        assert 'Results' not in entry
        return
    metrics = {key for result in entry['Results'] for key in result['Metrics']}
    if info['dataset'] == 'ade20k':
        assert metrics == {'mIoU', 'mAcc'}
    else:
        masks = 'mask' in info['method']
        assert metrics == ({'box AP', 'mask AP'} if masks else {'box AP'})


def test_quickstarts_train_in_float32_by_one_override():
    # the README's way to turn the quick-starts' bfloat16 off
    quickstart = REPO / 'configs/quickstart'
    seg = Config.fromfile(quickstart / 'fpn_agent-pvt-t_shapes.py')
    seg.merge_from_dict({'optim_wrapper.dtype': 'float32'})
    wrapper = build_optim_wrapper(torch.nn.Linear(2, 2), seg.optim_wrapper)
    with wrapper.optim_context(torch.nn.Linear(2, 2)):
        assert not torch.is_autocast_enabled('cpu')
    det = Config.fromfile(quickstart / 'mask-rcnn_agent-pvt-t_fpn_shapes.py')
    det.merge_from_dict({'custom_hooks.0.dtype': 'float32'})
    assert HOOKS.build(det.custom_hooks[0]).dtype is None


@pytest.mark.parametrize('config', [
    'agent_swin/mask-rcnn_agent-swin-t_fpn_ms-crop-1x_coco.py',
    'agent_swin/upernet_agent-swin-t_8xb2-160k_ade20k-512x512.py'
])
def test_swin_recipes_do_not_decay_an_absolute_position_embedding(config):
    cfg = _load(config)
    cfg.model.backbone.use_abs_pos_embed = True
    model = build_model(cfg)
    optimizer = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    embedding = model.backbone.absolute_pos_embed
    decay, = (group['weight_decay'] for group in optimizer.param_groups
              if any(param is embedding for param in group['params']))
    assert decay == 0
