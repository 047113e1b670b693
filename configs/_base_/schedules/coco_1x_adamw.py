# COCO 1x: 12 epochs, AdamW lr 1e-4, weight decay 0.05, steps at epochs 8 and 11, linear
# warm-up over the first 500 iterations (FLoRA paper, Table 9). The LR is for batch 32
# (auto_scale_lr in the dataset config). Weight decay per parameter: paramwise_adapters.py.
_base_ = ['./paramwise_adapters.py']

train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='AdapterOptimWrapperConstructor',
    # FlatAdamW: torch's fused AdamW arithmetic, one launch per flat buffer
    # (mm_spectral.FlatAdamW; merged configs get torch's AdamW back).
    optimizer=dict(type='FlatAdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg={{_base_.adapter_paramwise_cfg}})

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
