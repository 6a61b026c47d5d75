"""Models of mmdet / mmseg configs built for tiny inputs, and the tiny
batches they train and predict on; shared by the config tests."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from mmdet.registry import MODELS as DET_MODELS
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData, PixelData
from mmseg.registry import MODELS as SEG_MODELS
from mmseg.structures import SegDataSample

# side of the square test images: every stage keeps a token grid of at
# least 2x2
IMAGE_SIZE = 64


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Tiny tensors: threads cost more than they save (3x on 2 busy cores).
    Autouse in every test module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fewer_rois(model: Config) -> None:
    """Fewer proposals and sampled RoIs: cheaper R-CNN heads, same code."""
    if 'rpn_proposal' not in model.train_cfg:
        return
    model.train_cfg.rpn_proposal.max_per_img = 32
    model.test_cfg.rpn.max_per_img = 32
    rcnn = model.train_cfg.rcnn
    for stage in rcnn if isinstance(rcnn, list) else [rcnn]:
        stage.sampler.num = 16


def build_model(cfg: Config) -> nn.Module:
    """The config's model as constructed (no weights read), SyncBN as BN,
    for ``IMAGE_SIZE`` images and fewer RoIs."""
    init_default_scope(cfg.default_scope)
    cfg.model.backbone.init_cfg = None
    if cfg.default_scope == 'mmseg':
        registry = SEG_MODELS
        cfg.model.pretrained = None
        cfg.model.data_preprocessor.size = (IMAGE_SIZE, IMAGE_SIZE)
    else:
        registry = DET_MODELS
        fewer_rois(cfg.model)
    return revert_sync_batchnorm(registry.build(cfg.model))


def det_batch(size: int, with_gt: bool, with_mask: bool) -> dict:
    """One random ``size``² image, with two boxes (and masks) if asked."""
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


def seg_batch(size: int, num_images: int, num_classes: int) -> dict:
    """``num_images`` random ``size``² images with random label maps."""
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
