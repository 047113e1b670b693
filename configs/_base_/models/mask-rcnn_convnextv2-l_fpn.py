# Mask R-CNN with a ConvNeXt-V2-L backbone (mmdet's Mask R-CNN, backbone and FPN inputs
# replaced). Pretrained weights: a timm-layout state dict, e.g. converted from the official
# release with tools/convert/convnextv2_official_to_timm.py.
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py']

convnextv2_l = dict(
    type='ConvNeXtV2',
    arch='large',
    out_indices=(0, 1, 2, 3),
    drop_path_rate=0.4,
    with_cp=False,
    init_cfg=dict(type='Pretrained', checkpoint='checkpoints/convnextv2_large_22k_timm.pth'))

model = dict(
    backbone=dict(_delete_=True, **convnextv2_l),
    neck=dict(in_channels=[192, 384, 768, 1536]))
