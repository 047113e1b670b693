# A CPU-sized Oriented R-CNN (le90): ConvNeXt-V2-atto + FLoRA on generated DOTA-style
# rotated boxes (tools/data/generate_shapes.py --task dota). Used by the mmrotate test.
_base_ = [
    '../_base_/models/oriented-rcnn-le90_convnextv2-l_fpn.py',
    '../_base_/datasets/shapes_dota.py',
    '../_base_/default_runtime_rotated.py',
    '../_base_/adapters/targets.py',
]

channels = 64
model = dict(
    backbone=dict(
        _delete_=True,
        type='AdaptedBackbone',
        backbone=dict(type='ConvNeXtV2', arch='atto', out_indices=(0, 1, 2, 3)),
        adapter=dict(type='FLoRA', rank=8, kernel_rank=2, scale=4.0,
                     targets={{_base_.convnextv2_targets}}),
        trainable={{_base_.convnextv2_trainable}}),
    neck=dict(in_channels=[40, 80, 160, 320], out_channels=channels),
    rpn_head=dict(in_channels=channels, feat_channels=channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(in_channels=channels, fc_out_channels=256, num_classes=3)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=64)),
        rpn_proposal=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(nms_pre=300, max_per_img=50)))

max_epochs = 8
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    constructor='AdapterOptimWrapperConstructor',
    optimizer=dict(type='FlatAdamW', lr=2e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='MultiStepLR', by_epoch=True, milestones=[6], gamma=0.1),
]
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=max_epochs))
custom_hooks = [dict(type='AdapterHook')]
