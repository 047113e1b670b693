# FoRA, rank 64, 8000 coefficients per factor.
_base_ = ['../_base_/experiments/oriented-rcnn-le90_convnextv2-l_fpn_8xb2-1x_dota.py']

model = dict(backbone=dict(adapter={{_base_.convnextv2_fora_r64_n8000}}))
