# ConvNeXt-V2-L: ADE20K semantic segmentation, UperNet 512x512, 160k iterations, AdamW lr
# 1e-4, wd 0.05, batch 16 = 8 GPUs x 2 (FLoRA paper, Table 9). What every adapted ADE20K
# row shares: the backbone frozen inside AdaptedBackbone, its new output norms and the
# heads training. A row sets `model.backbone.adapter` (none set: the "Base" row).
_base_ = [
    '../models/upernet_convnextv2-l.py',
    '../datasets/ade20k_512.py',
    '../schedules/ade20k_160k_adamw.py',
    '../default_runtime_seg.py',
    '../adapters/convnextv2-l.py',
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='AdaptedBackbone',
        backbone={{_base_.convnextv2_l}},
        trainable={{_base_.convnextv2_trainable}}))

custom_hooks = [dict(type='AdapterHook'), dict(type='DeltaStatsHook', interval=50)]
