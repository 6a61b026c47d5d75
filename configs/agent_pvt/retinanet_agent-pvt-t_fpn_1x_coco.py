_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py'
]
custom_imports = dict(imports=['agent_mm'], allow_failed_imports=False)

# the authors' ImageNet-1K checkpoint
checkpoint_file = 'data/agent_pvt_t_max_acc.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='AgentPVT',
        arch='tiny',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[64, 128, 320, 512]))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, weight_decay=0.0001))

# 8 GPUs x 2 images
train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)

# checkpoints written to a temporary file and renamed, so that a kill cannot
# break one (interval and the rest from the base)
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
