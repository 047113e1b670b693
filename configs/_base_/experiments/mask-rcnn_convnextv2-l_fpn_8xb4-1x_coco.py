# ConvNeXt-V2-L: COCO instance segmentation, Mask R-CNN 1x (12 epochs), AdamW lr 1e-4,
# wd 0.05, batch 32 = 8 GPUs x 4 (FLoRA paper, Table 9). What every adapted COCO row
# shares: the backbone frozen inside AdaptedBackbone, its new output norms, the neck and
# the heads training. A row sets `model.backbone.adapter` (none set: the "Base" row).
_base_ = [
    '../models/mask-rcnn_convnextv2-l_fpn.py',
    '../datasets/coco_instance.py',
    '../schedules/coco_1x_adamw.py',
    '../default_runtime_det.py',
    '../adapters/convnextv2-l.py',
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='AdaptedBackbone',
        backbone={{_base_.convnextv2_l}},
        trainable={{_base_.convnextv2_trainable}}))

custom_hooks = [dict(type='AdapterHook'), dict(type='DeltaStatsHook', interval=50)]
