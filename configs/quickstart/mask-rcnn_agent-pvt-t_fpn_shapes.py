# Quick-start: Mask R-CNN with Agent-PVT-T trained from scratch on the
# built-in synthetic "shapes" data set (generated under data/shapes on first
# use). Heads are lightened so that a 2-core CPU trains it in minutes.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/default_runtime.py'
]
custom_imports = dict(
    imports=['agent_mm', 'agent_mm.datasets', 'agent_mm.det'],
    allow_failed_imports=False)

num_classes = 3
channels = 128
# strides of the pyramid levels P3-P6 that the RPN and RoI heads read
strides = [8, 16, 32, 64]
model = dict(
    backbone=dict(
        _delete_=True,
        type='AgentPVT',
        arch='tiny',
        drop_path_rate=0.1,
        # no stride-4 level: the FPN starts at stride 8, so a training step
        # costs 0.75 of one with P2, and 12 epochs beat 10 epochs with P2
        out_indices=(1, 2, 3),
        # agent grids sized for the 224-pixel inputs (token grids 56, 28,
        # 14, 7); the paper's (28, 28) for 800x1333 would upsample stages
        # 3-4 to 784 agents and cost a third of the training time, and 8x8
        # in stages 1-2 trains in 0.9 of the time of 12x12 and 16x16
        agent_shapes=[(8, 8), (8, 8), (7, 7), (7, 7)],
        init_cfg=None),
    # P3-P6 (the extra level is max-pooled from P5)
    neck=dict(
        in_channels=[128, 320, 512], out_channels=channels, num_outs=4),
    # anchors of 32-256 pixels, as mmdet's default gives on P2-P5 (the
    # shapes are at most ~90 pixels across at 224 pixels)
    rpn_head=dict(
        in_channels=channels,
        feat_channels=channels,
        anchor_generator=dict(scales=[4], strides=strides)),
    # SparseRoIAlign (agent_mm.det): mmcv's RoIAlign, several times faster
    # in CPU training; the same kernel as mmcv's in test
    roi_head=dict(
        bbox_roi_extractor=dict(
            roi_layer=dict(type='SparseRoIAlign'),
            out_channels=channels,
            featmap_strides=strides),
        bbox_head=dict(
            in_channels=channels,
            fc_out_channels=256,
            num_classes=num_classes,
            # GIoU on decoded boxes (as mmdet's giou configs) learns the
            # boxes faster than smooth L1 on deltas in this short schedule
            reg_decoded_bbox=True,
            loss_bbox=dict(_delete_=True, type='GIoULoss', loss_weight=10.0)),
        mask_roi_extractor=dict(
            roi_layer=dict(type='SparseRoIAlign'),
            out_channels=channels,
            featmap_strides=strides),
        # small initial mask logits (mmdet's init is tuned for 80 classes);
        # channels-last convolutions (oneDNN's layout): the head alone takes
        # 0.85 of its time in float32, 0.68 in bfloat16; the 2x2
        # deconvolution as one matrix product: a training step in 0.92-0.97
        # of the time in bfloat16, 0.97-0.98 in float32
        mask_head=dict(
            type='ScaledInitFCNMaskHead',
            channels_last=True,
            matmul_upsample=True,
            num_convs=2,
            in_channels=channels,
            conv_out_channels=channels,
            num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=200)))

# data: 200 train / 50 val images of 256x256 with 1-3 shapes each, seen at
# 224x224: a step costs about 0.8 of one at 256 and learns as well in 12
# epochs; boxes and masks are predicted back at 256 for the metric
dataset_type = 'ShapesDetDataset'
data_root = 'data/shapes/'
img_scale = (224, 224)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
# loading in the main process: on 2 cores, worker processes only compete
# with the model for the CPU
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='images/train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='images/val/'),
        test_mode=True,
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val.json',
    metric=['bbox', 'segm'])
test_evaluator = val_evaluator

# schedule: 12 epochs of 50 iterations, lr x0.1 for the last one
max_epochs = 12
train_cfg = dict(
    type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
         end=50),
    dict(type='MultiStepLR', by_epoch=True, begin=0, end=max_epochs,
         milestones=[11], gamma=0.1)
]
optim_wrapper = dict(
    type='OptimWrapper',
    # fused: one kernel for all parameters, 0.3 of the per-tensor step
    optimizer=dict(type='AdamW', lr=4e-4, weight_decay=1e-4, fused=True),
    clip_grad=dict(max_norm=10, norm_type=2))
auto_scale_lr = dict(enable=False, base_batch_size=4)
# backbone, neck and the heads' convolutions and fcs in bfloat16 autocast
# where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); float32
# elsewhere, or anywhere with `--cfg-options custom_hooks.0.dtype=float32`.
# RoI extraction, NMS and the losses stay in float32 (mmcv's CPU RoIAlign
# and NMS take float32 only).
custom_hooks = [
    dict(
        type='FeatureAutocastHook',
        native_only=True,
        heads=('rpn_head', 'roi_head.bbox_head', 'roi_head.mask_head'))
]

# a fixed seed makes the quick-start reproducible (runs with other seeds
# land a few points either side)
randomness = dict(seed=0)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    # written to a temporary file and renamed: a kill cannot break it
    checkpoint=dict(
        type='AtomicCheckpointHook', interval=1, max_keep_ckpts=2))
