# ViT-L/16: ADE20K semantic segmentation, UperNet 512x512, 160k iterations, AdamW lr 1e-4,
# wd 0.05, batch 16 = 8 GPUs x 2 (FLoRA paper, Table 9).
# FourierFT (Gao et al., ICML 2024): ΔW = α·Re(IDFT2(F)) with 3000 learnable
# coefficients per layer; α is task-sensitive (peft's default 150): tune it per task.
_base_ = [
    '../_base_/models/upernet_vit-l.py',
    '../_base_/datasets/ade20k_512.py',
    '../_base_/schedules/ade20k_160k_adamw.py',
    '../_base_/default_runtime_seg.py',
    '../_base_/adapters/targets.py',
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='AdaptedBackbone',
        backbone={{_base_.vit_l}},
        adapter=dict(type='FourierFT', n=3000, alpha=150.0, seed=777, targets={{_base_.vit_targets}}),
        trainable={{_base_.vit_trainable}}))

custom_hooks = [dict(type='AdapterHook'), dict(type='DeltaStatsHook', interval=50)]
