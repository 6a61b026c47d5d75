_base_ = './fpn_agent-pvt-t_8xb2-40k_ade20k-512x512.py'

checkpoint_file = 'data/agent_pvt_s_max_acc.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.1,
        init_cfg=dict(checkpoint=checkpoint_file)))
