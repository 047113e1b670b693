# FoRA: LoRA factors of rank 64, each the real inverse DFT of 8000 learnable spectral
# coefficients (16000 parameters per layer at any rank).
_base_ = ['../_base_/experiments/oriented-rcnn-le90_convnextv2-l_fpn_8xb2-1x_dota.py']

model = dict(
    backbone=dict(
        adapter=dict(
            type='FoRA',
            rank=64,
            n=8000,
            scale=1.0,
            seed=777,
            targets={{_base_.convnextv2_targets}})))
