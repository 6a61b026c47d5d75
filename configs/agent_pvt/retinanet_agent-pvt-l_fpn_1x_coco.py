_base_ = './retinanet_agent-pvt-t_fpn_1x_coco.py'

checkpoint_file = 'data/agent_pvt_l_max_acc.pth'
model = dict(
    backbone=dict(
        arch='large',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint=checkpoint_file)))
