# FourierFT (Gao et al., ICML 2024): ΔW = α·Re(IDFT2(F)) with 3000 learnable
# coefficients per layer; α is task-sensitive (peft's default 150): tune it per task.
_base_ = ['../_base_/experiments/mask-rcnn_convnextv2-l_fpn_8xb4-1x_coco.py']

model = dict(
    backbone=dict(
        adapter=dict(
            type='FourierFT',
            n=3000,
            alpha=150.0,
            seed=777,
            targets={{_base_.convnextv2_targets}})))
