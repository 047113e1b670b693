# InternViT-6B: ADE20K semantic segmentation, UperNet 512x512, 160k iterations, AdamW lr 1e-4,
# wd 0.05, batch 16 = 8 GPUs x 2 (FLoRA paper, Table 9).
# FLoRA (Si et al.): Tucker core 32x32 on every linear of every block, scale s=0.04
# (the FLoRA paper's InternViT-6B setting).
_base_ = [
    '../_base_/models/upernet_internvit-6b.py',
    '../_base_/datasets/ade20k_512.py',
    '../_base_/schedules/ade20k_160k_adamw.py',
    '../_base_/default_runtime_seg.py',
    '../_base_/adapters/targets.py',
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='AdaptedBackbone',
        backbone={{_base_.internvit_6b}},
        adapter=dict(type='FLoRA', rank=32, scale=0.04, targets={{_base_.internvit6b_targets}}),
        trainable={{_base_.vit_trainable}}))

custom_hooks = [dict(type='AdapterHook'), dict(type='DeltaStatsHook', interval=50)]
