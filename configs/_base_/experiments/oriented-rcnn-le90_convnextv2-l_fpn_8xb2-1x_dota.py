# ConvNeXt-V2-L: DOTA-v1.0 oriented detection, Oriented R-CNN le90, 12 epochs, SGD lr 5e-3,
# wd 1e-4, batch 16 = 8 GPUs x 2 (FLoRA paper, Table 9); data split with
# tools/data/dota_split.py. What every adapted DOTA row shares: the backbone frozen inside
# AdaptedBackbone, its new output norms, the neck and the heads training. A row sets
# `model.backbone.adapter` (none set: the "Base" row).
_base_ = [
    '../models/oriented-rcnn-le90_convnextv2-l_fpn.py',
    '../datasets/dota_le90.py',
    '../schedules/dota_1x_sgd.py',
    '../default_runtime_rotated.py',
    '../adapters/convnextv2-l.py',
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='AdaptedBackbone',
        backbone={{_base_.convnextv2_l}},
        trainable={{_base_.convnextv2_trainable}}))

custom_hooks = [dict(type='AdapterHook'), dict(type='DeltaStatsHook', interval=50)]
