_base_ = './upernet_agent-swin-t_8xb2-160k_ade20k-512x512.py'

checkpoint_file = 'data/agent_swin_s_max_acc.pth'
model = dict(
    backbone=dict(
        arch='small',
        # the segmentation variant: 7x7 agents in stage 3
        agent_shapes=[(9, 9), (12, 12), (7, 7), (7, 7)],
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint=checkpoint_file)))
