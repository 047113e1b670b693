# InternViT-6B: ADE20K semantic segmentation, UperNet on 504x504 crops (patch 14, as
# InternVL's ADE20K configs), 160k iterations, AdamW lr 1e-4, wd 0.05, batch 16 = 8 GPUs x 2
# (FLoRA paper, Table 9). What every adapted row of the paper's Table 2 shares: the
# backbone frozen inside AdaptedBackbone, its new pyramid and the heads training. A row
# sets `model.backbone.adapter` (none set: the "Base" row).
_base_ = [
    '../models/upernet_internvit-6b.py',
    '../datasets/ade20k_504.py',
    '../schedules/ade20k_160k_adamw.py',
    '../default_runtime_seg.py',
    '../adapters/targets.py',
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='AdaptedBackbone',
        backbone={{_base_.internvit_6b}},
        trainable={{_base_.vit_trainable}}))

custom_hooks = [dict(type='AdapterHook'), dict(type='DeltaStatsHook', interval=50)]
