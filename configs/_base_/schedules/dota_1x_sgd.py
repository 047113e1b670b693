# DOTA 1x: 12 epochs, SGD lr 5e-3, momentum 0.9, weight decay 1e-4, steps at epochs 8 and
# 11, linear warm-up over 500 iterations from lr/3, gradient norm clipped at 35 (mmrotate's
# schedule_1x; FLoRA paper, Table 9). The LR is for batch 16 (auto_scale_lr in the dataset
# config).
# Validation (on trainval patches, as in mmrotate) once, at the end. Weight decay per
# parameter: paramwise_adapters.py.
_base_ = ['./paramwise_adapters.py']

train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=12)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='AdapterOptimWrapperConstructor',
    optimizer=dict(type='SGD', lr=5e-3, momentum=0.9, weight_decay=1e-4),
    clip_grad=dict(max_norm=35, norm_type=2),
    paramwise_cfg={{_base_.adapter_paramwise_cfg}})

param_scheduler = [
    dict(type='LinearLR', start_factor=1.0 / 3, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
