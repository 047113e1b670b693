# The CPU demo (`make demo`, tools/demo.py): FLoRA on every conv of mmdet's ResNet-18
# (7x7 stem, 3x3 convs, 1x1 downsamples: 4-mode Tucker adapters) in a Mask R-CNN on
# generated shapes, sized for a few minutes on 2 cores: 128x128 images, 64-channel FPN and
# heads, small RPN/RoI samples. The backbone is frozen (BN statistics too: norm_eval);
# adapters, neck and heads train. tools/demo.py first pretrains the plain model on other
# generated data, as no pretrained weights can be downloaded here.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    '../_base_/datasets/shapes_coco_instance.py',
    '../_base_/default_runtime_det.py',
    '../_base_/adapters/targets.py',
]

# every conv of a torchvision-style ResNet: stem, 3x3/1x1 convs of blocks, downsamples
resnet_targets = [r'conv1', r'layer\d\.\d+\.conv\d', r'layer\d\.\d+\.downsample\.0']

channels = 64
num_classes = 3
model = dict(
    backbone=dict(
        _delete_=True,
        type='AdaptedBackbone',
        backbone=dict(type='ResNet', depth=18, frozen_stages=-1, norm_eval=True,
                      norm_cfg=dict(type='BN', requires_grad=True), init_cfg=None),
        adapter=dict(type='FLoRA', rank=8, kernel_rank=2, scale=4.0, targets=resnet_targets)),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=channels),
    rpn_head=dict(in_channels=channels, feat_channels=channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(in_channels=channels, fc_out_channels=256, num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=channels),
        mask_head=dict(num_convs=2, in_channels=channels, conv_out_channels=channels,
                       num_classes=num_classes)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=64)),
        rpn_proposal=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(max_per_img=20)))

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
