# AgentAttention2d after conv2 of every bottleneck of stages c3-c5 of a
# ResNet / ResNeXt (mmdet's or mmseg's), the way mmdet's GCNet configs add
# ContextBlock; the configs of this folder set model.backbone.plugins to it
agent_plugins = [
    dict(
        cfg=dict(type='AgentAttention2d'),
        stages=(False, True, True, True),
        position='after_conv2')
]
