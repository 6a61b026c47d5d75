_base_ = './upernet_agent-swin-t_8xb2-160k_ade20k-512x512.py'

checkpoint_file = 'data/agent_swin_b_max_acc.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.5,
        init_cfg=dict(checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
