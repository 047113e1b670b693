# A CPU-sized UperNet: ConvNeXt-V2-atto + FLoRA on generated ADE20K-style shapes
# (tools/data/generate_shapes.py --task ade). Used by the mmseg end-to-end test.
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    '../_base_/datasets/shapes_ade.py',
    '../_base_/default_runtime_seg.py',
    '../_base_/adapters/targets.py',
]

num_classes = 4
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=(128, 128)),
    backbone=dict(
        _delete_=True,
        type='AdaptedBackbone',
        backbone=dict(type='ConvNeXtV2', arch='atto', out_indices=(0, 1, 2, 3)),
        adapter=dict(type='FLoRA', rank=8, kernel_rank=2, scale=4.0,
                     targets={{_base_.convnextv2_targets}}),
        trainable={{_base_.convnextv2_trainable}}),
    decode_head=dict(in_channels=[40, 80, 160, 320], channels=64, num_classes=num_classes,
                     norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=160, channels=32, num_classes=num_classes,
                        norm_cfg=norm_cfg))

train_cfg = dict(type='IterBasedTrainLoop', max_iters=200, val_interval=200)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    constructor='AdapterOptimWrapperConstructor',
    optimizer=dict(type='FlatAdamW', lr=2e-3, weight_decay=0.05))
param_scheduler = [dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=0, end=200)]
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(by_epoch=False, interval=200))
custom_hooks = [dict(type='AdapterHook')]
