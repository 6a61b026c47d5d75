"""Trained quick-start models give the same metrics evaluated in float32
and with ``tools/test.py --amp`` (backbone and neck in bfloat16 on CPUs).

Each model is fitted to a small generated set and evaluated on those same
images: a few dozen steps make its predictions far above chance (asserted),
so that the comparison can fail. A detector that predicts nothing, or a
segmentor that predicts background everywhere, scores the same in both
precisions.
"""
import os.path as osp
import sys

import pytest
from tiny_configs import DET_CONFIG, REPO, SEG_CONFIG, loaders, tiny_config

sys.path.insert(0, osp.join(REPO, 'tools'))
import test as test_tool  # noqa: E402
import train as train_tool  # noqa: E402

# a few minutes on an AVX-512 CPU; several times that on a CPU without
# native bfloat16 (AVX2 only), where the --amp forwards are emulated
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

# mixed precision may move a metric by at most this (mmseg reports
# percentages, mmdet fractions)
TOLERANCE = {'mIoU': 1.0, 'coco/bbox_mAP': 0.01, 'coco/segm_mAP': 0.01}
# a short warm-up, then the constant learning rate
WARMUP = '''
param_scheduler = [dict(type='LinearLR', start_factor=0.001,
                        by_epoch=False, begin=0, end=20)]
'''
# 16 training images, each seen 30 times (segmentation: batches of 8) or 20
# times (detection: batches of 4) in 60 and 80 steps; the validation images
# are not used
DATA = 'dict(num_train=16, num_val=4, img_size=128, seed=1)'
SEG_ITERS, DET_EPOCHS = 60, 20

# the configs resize to 128 (segmentation) and 224 pixels: a step here
# costs about half
SEG_SIZE, DET_SIZE = 96, 128
SEG_OVERRIDES = loaders(
    "data_prefix=dict(img_path='images/train', "
    "seg_map_path='ann_semseg/train')", SEG_SIZE) + WARMUP + f'''
model = dict(data_preprocessor=dict(size=({SEG_SIZE}, {SEG_SIZE})))
train_cfg = dict(max_iters={SEG_ITERS}, val_interval={SEG_ITERS})
default_hooks = dict(checkpoint=dict(interval={SEG_ITERS}))
'''
DET_OVERRIDES = loaders(
    "ann_file='annotations/instances_train.json', "
    "data_prefix=dict(img='images/train/')", DET_SIZE) + WARMUP + f'''
val_evaluator = dict(ann_file=data_root + 'annotations/instances_train.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs={DET_EPOCHS}, val_interval={DET_EPOCHS})
default_hooks = dict(checkpoint=dict(interval={DET_EPOCHS}))
'''
FLOWS = {
    # name: (config, overrides, checkpoint, {metric: floor}, options of
    #        the float32 evaluation)
    # Predicting background everywhere scores mIoU 22.6 on these images
    # (background is 90 % of the pixels); 60 steps reach about 38.
    'segmentation': (SEG_CONFIG, SEG_OVERRIDES, f'iter_{SEG_ITERS}.pth',
                     {'mIoU': 30.0}, []),
    # 80 steps reach bbox / segm mAP about 0.17; rounding changes the
    # trajectory with the thread count and CPU. The float32 evaluation
    # turns off the config's own FeatureAutocastHook, which runs in
    # bfloat16 where the CPU has it.
    'detection': (DET_CONFIG, DET_OVERRIDES, f'epoch_{DET_EPOCHS}.pth',
                  {'coco/bbox_mAP': 0.08, 'coco/segm_mAP': 0.08},
                  ['--cfg-options', 'custom_hooks.0.dtype=float32']),
}


@pytest.mark.parametrize('flow', sorted(FLOWS))
def test_bfloat16_evaluation_gives_the_float32_metrics(
        tmp_path, monkeypatch, flow):
    base, overrides, checkpoint, floors, float32_options = FLOWS[flow]
    # the CPU path of --amp, also where a GPU is present
    monkeypatch.setattr(test_tool, 'has_accelerator', lambda: False)
    config = tiny_config(tmp_path, base, overrides, data=DATA)
    work_dir = str(tmp_path / 'work')
    train_tool.main([config, '--work-dir', work_dir])
    args = [config, osp.join(work_dir, checkpoint), '--work-dir', work_dir]
    float32 = test_tool.main(args + float32_options)
    bfloat16 = test_tool.main(args + ['--amp'])
    for metric, floor in floors.items():
        assert float32[metric] >= floor, (metric, float32)
        assert abs(bfloat16[metric] - float32[metric]) <= TOLERANCE[metric], (
            metric, float32[metric], bfloat16[metric])
