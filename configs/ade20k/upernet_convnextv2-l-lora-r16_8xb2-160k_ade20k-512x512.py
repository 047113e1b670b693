# ConvNeXt-V2-L: ADE20K semantic segmentation, UperNet 512x512, 160k iterations, AdamW lr 1e-4,
# wd 0.05, batch 16 = 8 GPUs x 2 (FLoRA paper, Table 9).
# LoRA baseline: rank 16, alpha 16.
_base_ = [
    '../_base_/models/upernet_convnextv2-l.py',
    '../_base_/datasets/ade20k_512.py',
    '../_base_/schedules/ade20k_160k_adamw.py',
    '../_base_/default_runtime_seg.py',
    '../_base_/adapters/targets.py',
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='AdaptedBackbone',
        backbone={{_base_.convnextv2_l}},
        adapter=dict(type='LoRA', rank=16, alpha=16, targets={{_base_.convnextv2_targets}}),
        trainable={{_base_.convnextv2_trainable}}))

custom_hooks = [dict(type='AdapterHook'), dict(type='DeltaStatsHook', interval=50)]
