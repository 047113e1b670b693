# ADE20K 160k: 160k iterations, validation every 16k, AdamW lr 1e-4, weight decay 0.05,
# linear warm-up over 1500 iterations then linear (power 1.0) decay to 0 (FLoRA paper,
# Table 9). The LR is for batch 16 (auto_scale_lr in the dataset config). Checkpoints every
# 16k iterations are set in default_runtime_seg.py. Weight decay per parameter:
# paramwise_adapters.py.
_base_ = ['./paramwise_adapters.py']

train_cfg = dict(type='IterBasedTrainLoop', max_iters=160000, val_interval=16000)
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
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=160000),
]
