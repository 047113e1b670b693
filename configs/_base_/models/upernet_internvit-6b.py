# UperNet with InternViT-6B (48 layers, width 3200): four block outputs turned into four
# scales; activation checkpointing on (the frozen 6B backbone does not fit otherwise).
# Weights: the released checkpoint converted with tools/convert/internvit6b_to_mm.py.
# Inputs are multiples of patch 14 as in InternVL's ADE20K configs: 504 crops (36 x 36
# tokens; the 224 px release's 16 x 16 position grid is resampled to them), sliding-window
# inference with 504 windows at stride 322.
_base_ = ['mmseg::_base_/models/upernet_r50.py']

internvit_6b = dict(
    type='InternViT6B',
    embed_dim=3200,
    depth=48,
    num_heads=25,
    mlp_ratio=4.0,
    patch_size=14,
    img_size=504,
    pretrain_size=224,
    out_indices=(11, 23, 35, 47),
    drop_path_rate=0.4,
    with_cp=True,
    init_cfg=dict(type='Pretrained', checkpoint='checkpoints/internvit_6b_224px_mm.pth'))

# The 448 px releases (InternViT-6B-448px-V1-2 / V1-5 / V2-5) have 45 layers and a 32 x 32
# position grid: merge this into the backbone (the *-448px-* configs do). With the 224 px
# settings above such a checkpoint is refused when loading, not loaded in part.
internvit_6b_448px = dict(
    depth=45,
    out_indices=(11, 22, 33, 44),
    pretrain_size=448,
    init_cfg=dict(checkpoint='checkpoints/internvit_6b_448px_v2_5_mm.pth'))

model = dict(
    pretrained=None,  # weights come from the backbone's init_cfg
    data_preprocessor=dict(size=(504, 504)),
    backbone=dict(_delete_=True, **internvit_6b),
    decode_head=dict(in_channels=[3200] * 4, channels=512, num_classes=150),
    auxiliary_head=dict(in_channels=3200, num_classes=150),
    test_cfg=dict(mode='slide', crop_size=(504, 504), stride=(322, 322)))
