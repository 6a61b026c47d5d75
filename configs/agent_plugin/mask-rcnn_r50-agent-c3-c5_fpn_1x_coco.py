# mmdet's Mask R-CNN R-50 1x with AgentAttention2d in stages c3-c5
_base_ = [
    'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './_base_/agent-c3-c5.py'
]
custom_imports = dict(imports=['agent_mm'], allow_failed_imports=False)

model = dict(backbone=dict(plugins={{_base_.agent_plugins}}))

# checkpoints written to a temporary file and renamed, so that a kill cannot
# break one (interval and the rest from the base)
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
