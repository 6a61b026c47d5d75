# mmseg's Semantic FPN R-50 on ADE20K with AgentAttention2d in stages c3-c5
_base_ = [
    'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py',
    './_base_/agent-c3-c5.py'
]
custom_imports = dict(imports=['agent_mm'], allow_failed_imports=False)

model = dict(backbone=dict(plugins={{_base_.agent_plugins}}))

# checkpoints written to a temporary file and renamed, so that a kill cannot
# break one (interval and the rest from the base)
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
