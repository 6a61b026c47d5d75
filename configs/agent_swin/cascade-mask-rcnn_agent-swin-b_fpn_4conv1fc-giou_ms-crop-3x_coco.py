_base_ = (
    './cascade-mask-rcnn_agent-swin-t_fpn_4conv1fc-giou_ms-crop-3x_coco.py')

checkpoint_file = 'data/agent_swin_b_max_acc.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.4,
        init_cfg=dict(checkpoint=checkpoint_file)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
