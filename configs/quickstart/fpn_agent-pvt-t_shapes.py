# Quick-start: Semantic FPN with Agent-PVT-T trained from scratch on the
# built-in synthetic "shapes" data set (generated under data/shapes on first
# use), small enough for a 2-core CPU.
_base_ = [
    'mmseg::_base_/models/fpn_r50.py', 'mmseg::_base_/default_runtime.py'
]
custom_imports = dict(
    imports=['agent_mm', 'agent_mm.datasets'], allow_failed_imports=False)

# The 256-pixel images are seen at half size: the shapes (40-100 pixels
# across) stay clear and an image costs a quarter, so the model sees more
# images in the same time, which learns faster in this budget.
img_scale = (128, 128)
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    pretrained=None,  # the base's ResNet weights; ours start from scratch
    data_preprocessor=dict(size=img_scale),
    backbone=dict(
        _delete_=True,
        type='AgentPVT',
        arch='tiny',
        drop_path_rate=0.,
        out_indices=(0, 1, 2, 3),
        # agent grids sized for small inputs (token grids 32, 16, 8, 4), as
        # in the detection quick-start: 8x8 in stages 1-2 took 0.88-0.97 of
        # the step of 12x12 and 16x16 (AMD EPYC, bfloat16), mIoU 66.6-70.3
        # over three seeds against 64.6-74.1
        agent_shapes=[(8, 8), (8, 8), (7, 7), (7, 7)],
        # the stage outputs as channels-last views: the neck's and head's
        # convolutions run in that layout (a training step in 0.92-0.94 of
        # the time on an AMD EPYC, float32 and bfloat16)
        channels_last_outputs=True,
        init_cfg=None),
    neck=dict(in_channels=[64, 128, 320, 512], out_channels=128),
    decode_head=dict(
        in_channels=[128, 128, 128, 128],
        channels=64,
        num_classes=4,
        norm_cfg=norm_cfg,
        # background covers ~92% of the pixels: weighted down in the
        # cross-entropy. mmseg's DiceLoss sums over all classes and pixels
        # of an image, so it adds a soft overlap term, not a per-class
        # balance (Lovasz-softmax in its place measured the same mIoU)
        loss_decode=[
            dict(
                type='CrossEntropyLoss',
                use_sigmoid=False,
                loss_weight=1.0,
                class_weight=[0.25, 1.0, 1.0, 1.0]),
            dict(type='DiceLoss', use_sigmoid=False, loss_weight=1.0)
        ]))

dataset_type = 'ShapesSegDataset'
data_root = 'data/shapes/'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    # a rotation by a multiple of 90 degrees, then a flip, at random: one of
    # the four reflections of the square (never the image as it is), four
    # views of each of the 200 training images (mIoU 63-72 over three
    # seeds; 45-59 with RandomFlip)
    dict(type='RandomRotFlip', rotate_prob=0., flip_prob=1.),
    dict(type='PackSegInputs')
]
# predictions are resized back to the 256-pixel label maps for the metric
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
# loading in the main process: on 2 cores, worker processes only compete
# with the model for the CPU
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(
            img_path='images/train', seg_map_path='ann_semseg/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/val', seg_map_path='ann_semseg/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

max_iters = 1800
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
# bfloat16 autocast: on a CPU with native bfloat16 (AVX512-BF16 or AMX) a
# step takes about 0.67 of the float32 time, which buys the steps this
# recipe needs in 10 minutes; a CPU without it trains in float32
# (native_only), `--cfg-options optim_wrapper.dtype=float32` trains in
# float32 anywhere, and on a GPU use `--amp`. Clipping the gradient norm to 1
# kept the training loss falling when the bfloat16 backward had a bug (fixed
# in a6d5c9d; one run without clipping since: mIoU 74.2, no stall); kept, as
# the recipe measured over several seeds (docs/quickstart_tuning.md).
optim_wrapper = dict(
    type='CPUAmpOptimWrapper',
    native_only=True,
    # fused: one kernel for all parameters, 0.3 of the per-tensor step
    optimizer=dict(type='AdamW', lr=4e-4, weight_decay=1e-4, fused=True),
    clip_grad=dict(max_norm=1.0, norm_type=2))
# constant lr after the warm-up, x0.1 for the last 15% of the steps
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
         end=50),
    dict(
        type='MultiStepLR',
        by_epoch=False,
        begin=0,
        end=max_iters,
        milestones=[int(max_iters * 0.85)],
        gamma=0.1)
]

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    # written to a temporary file and renamed: a kill cannot break it
    checkpoint=dict(
        type='AtomicCheckpointHook', by_epoch=False, interval=100,
        max_keep_ckpts=2),
    visualization=dict(type='SegVisualizationHook', interval=1))
log_processor = dict(by_epoch=False)

# a fixed seed makes the quick-start reproducible
randomness = dict(seed=0)
