# FoRA, rank 64, 8000 coefficients per factor.
_base_ = ['../_base_/experiments/mask-rcnn_convnextv2-l_fpn_8xb4-1x_coco.py']

model = dict(backbone=dict(adapter={{_base_.convnextv2_fora_r64_n8000}}))
