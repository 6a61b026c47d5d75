# The 3x schedule of the paper's Agent-Swin COCO recipe: 36 epochs, lr x0.1 at
# epochs 27 and 33, after the 1x schedule's 500-iteration linear warm-up. A
# variable, not train_cfg / param_scheduler (mmengine refuses a key defined in
# two bases, and the 1x config beside it defines them): the 3x configs use
# train_cfg = {{_base_.schedule_3x.train_cfg}} and the same for param_scheduler
max_epochs = 36
schedule_3x = dict(
    train_cfg=dict(max_epochs=max_epochs),
    param_scheduler=[
        dict(
            type='LinearLR',
            start_factor=0.001,
            by_epoch=False,
            begin=0,
            end=500),
        dict(
            type='MultiStepLR',
            begin=0,
            end=max_epochs,
            by_epoch=True,
            milestones=[27, 33],
            gamma=0.1)
    ])
