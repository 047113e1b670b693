# UperNet with InternViT-6B (48 layers, width 3200): four block outputs turned into four
# scales; activation checkpointing on (the frozen 6B backbone does not fit otherwise).
# Weights: the released checkpoint converted with tools/convert/internvit6b_to_mm.py.
_base_ = ['mmseg::_base_/models/upernet_r50.py']

internvit_6b = dict(
    type='InternViT6B',
    embed_dim=3200,
    depth=48,
    num_heads=25,
    mlp_ratio=4.0,
    patch_size=14,
    img_size=224,
    out_indices=(11, 23, 35, 47),
    drop_path_rate=0.4,
    with_cp=True,
    init_cfg=dict(type='Pretrained', checkpoint='checkpoints/internvit_6b_224px_mm.pth'))

model = dict(
    pretrained=None,  # weights come from the backbone's init_cfg
    data_preprocessor=dict(size=(512, 512)),
    backbone=dict(_delete_=True, **internvit_6b),
    decode_head=dict(in_channels=[3200] * 4, channels=512, num_classes=150),
    auxiliary_head=dict(in_channels=3200, num_classes=150),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))
