# ViT-L/16: ADE20K semantic segmentation, UperNet 512x512, 160k iterations, AdamW lr 1e-4,
# wd 0.05, batch 16 = 8 GPUs x 2 (the FLoRA paper's ADE20K schedule, Table 9). The backbone
# frozen inside AdaptedBackbone, its new pyramid and the heads training; a row sets
# `model.backbone.adapter`.
_base_ = [
    '../models/upernet_vit-l.py',
    '../datasets/ade20k_512.py',
    '../schedules/ade20k_160k_adamw.py',
    '../default_runtime_seg.py',
    '../adapters/targets.py',
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='AdaptedBackbone',
        backbone={{_base_.vit_l}},
        trainable={{_base_.vit_trainable}}))

custom_hooks = [dict(type='AdapterHook'), dict(type='DeltaStatsHook', interval=50)]
