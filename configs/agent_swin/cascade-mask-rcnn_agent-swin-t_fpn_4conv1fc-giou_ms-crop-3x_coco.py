_base_ = [
    './cascade-mask-rcnn_agent-swin-t_fpn_4conv1fc-giou_ms-crop-1x_coco.py',
    './_base_/schedule_3x.py'
]

train_cfg = {{_base_.schedule_3x.train_cfg}}
param_scheduler = {{_base_.schedule_3x.param_scheduler}}
