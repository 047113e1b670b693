# UperNet with a ConvNeXt-V2-L backbone for ADE20K (mmseg's UperNet, backbone replaced).
_base_ = ['mmseg::_base_/models/upernet_r50.py']

convnextv2_l = dict(
    type='ConvNeXtV2',
    arch='large',
    out_indices=(0, 1, 2, 3),
    drop_path_rate=0.4,
    with_cp=False,
    init_cfg=dict(type='Pretrained', checkpoint='checkpoints/convnextv2_large_22k_timm.pth'))

model = dict(
    pretrained=None,  # weights come from the backbone's init_cfg
    data_preprocessor=dict(size=(512, 512)),
    backbone=dict(_delete_=True, **convnextv2_l),
    decode_head=dict(in_channels=[192, 384, 768, 1536], num_classes=150),
    auxiliary_head=dict(in_channels=768, num_classes=150),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))
