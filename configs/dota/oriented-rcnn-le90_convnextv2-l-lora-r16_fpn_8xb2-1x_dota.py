# LoRA baseline: rank 16, alpha 16; a conv's weight is the matrix (out, in/groups * kh * kw).
_base_ = ['../_base_/experiments/oriented-rcnn-le90_convnextv2-l_fpn_8xb2-1x_dota.py']

model = dict(
    backbone=dict(
        adapter=dict(type='LoRA', rank=16, alpha=16, targets={{_base_.convnextv2_targets}})))
