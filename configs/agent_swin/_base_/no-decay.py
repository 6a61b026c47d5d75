# The paper's Agent-Swin parameter groups, for the detection and segmentation
# recipes alike: no weight decay on the window blocks' relative position bias
# tables, the absolute position embedding (when use_abs_pos_embed is on), the
# six agent biases and the norms. A variable, not an optim_wrapper
# (mmengine refuses a key defined in two bases, and the mmdet / mmseg schedule
# bases define optim_wrapper): the recipes set
# paramwise_cfg={{_base_.swin_no_decay}}
swin_no_decay = dict(
    custom_keys={
        'relative_position_bias_table': dict(decay_mult=0.),
        'absolute_pos_embed': dict(decay_mult=0.),
        'an_bias': dict(decay_mult=0.),
        'na_bias': dict(decay_mult=0.),
        'ah_bias': dict(decay_mult=0.),
        'aw_bias': dict(decay_mult=0.),
        'ha_bias': dict(decay_mult=0.),
        'wa_bias': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.)
    })
