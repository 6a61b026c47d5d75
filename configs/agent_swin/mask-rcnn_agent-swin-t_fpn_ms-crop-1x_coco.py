_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    './_base_/ms-crop-1x_coco.py'
]

# the authors' ImageNet-1K checkpoint
checkpoint_file = 'data/agent_swin_t_max_acc.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='AgentSwinTransformer',
        arch='tiny',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[96, 192, 384, 768]))
