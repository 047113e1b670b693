# LoRA baseline: rank 16, alpha 16; a conv's weight is the matrix (out, in/groups * kh * kw).
_base_ = ['../_base_/experiments/upernet_convnextv2-l_8xb2-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        adapter=dict(type='LoRA', rank=16, alpha=16, targets={{_base_.convnextv2_targets}})))
