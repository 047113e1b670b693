# ConvNeXt-V2-L: COCO instance segmentation, Mask R-CNN 1x (12 epochs), AdamW lr 1e-4, wd 0.05,
# batch 32 = 8 GPUs x 4 (FLoRA paper, Table 9).
# FLoRA (Si et al.): Tucker core of size 16 on the channel modes and 2 on the spatial
# modes, scale s=4, on every backbone conv (stem, downsampling, depthwise) and linear.
_base_ = [
    '../_base_/models/mask-rcnn_convnextv2-l_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/coco_1x_adamw.py',
    '../_base_/default_runtime_det.py',
    '../_base_/adapters/targets.py',
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='AdaptedBackbone',
        backbone={{_base_.convnextv2_l}},
        adapter=dict(type='FLoRA', rank=16, kernel_rank=2, scale=4.0, targets={{_base_.convnextv2_targets}}),
        trainable={{_base_.convnextv2_trainable}}))

custom_hooks = [dict(type='AdapterHook'), dict(type='DeltaStatsHook', interval=50)]
