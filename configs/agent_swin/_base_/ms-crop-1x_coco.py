# The paper's Agent-Swin COCO recipe, shared by the Mask R-CNN and Cascade
# Mask R-CNN configs (which add the model): data, 1x schedule, runtime,
# DETR-style multi-scale/crop augmentation and AdamW without weight decay on
# norms, position biases and agent biases.
_base_ = [
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py', './no-decay.py'
]
custom_imports = dict(imports=['agent_mm'], allow_failed_imports=False)

# augmentation strategy originates from DETR / Sparse R-CNN
ms_scales = [(short_side, 1333) for short_side in range(480, 801, 32)]
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[[
            dict(type='RandomChoiceResize', scales=ms_scales, keep_ratio=True)
        ],
                    [
                        dict(
                            type='RandomChoiceResize',
                            scales=[(400, 1333), (500, 1333), (600, 1333)],
                            keep_ratio=True),
                        dict(
                            type='RandomCrop',
                            crop_type='absolute_range',
                            crop_size=(384, 600),
                            allow_negative_crop=True),
                        dict(
                            type='RandomChoiceResize',
                            scales=ms_scales,
                            keep_ratio=True)
                    ]]),
    dict(type='PackDetInputs')
]
# 8 GPUs x 2 images
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))
auto_scale_lr = dict(enable=False, base_batch_size=16)

# no weight decay on position biases, agent biases and norms
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg={{_base_.swin_no_decay}})

# checkpoints written to a temporary file and renamed, so that a kill cannot
# break one (interval and the rest from the base)
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
