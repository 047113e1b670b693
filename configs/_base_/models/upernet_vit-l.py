# UperNet with a timm ViT-L/16 backbone: blocks 8/12/16/24 turned into strides 4-32.
_base_ = ['mmseg::_base_/models/upernet_r50.py']

vit_l = dict(
    type='TimmViT',
    arch='vit_large_patch16_224',
    img_size=512,
    out_indices=(7, 11, 15, 23),
    drop_path_rate=0.3,
    with_cp=False,
    init_cfg=dict(type='Pretrained', checkpoint='checkpoints/vit_large_patch16_224_timm.pth'))

model = dict(
    pretrained=None,  # weights come from the backbone's init_cfg
    data_preprocessor=dict(size=(512, 512)),
    backbone=dict(_delete_=True, **vit_l),
    decode_head=dict(in_channels=[1024] * 4, num_classes=150),
    auxiliary_head=dict(in_channels=1024, num_classes=150),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))
