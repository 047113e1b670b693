# FourierFT, 3000 coefficients per layer, α = 150.
_base_ = ['../_base_/experiments/mask-rcnn_convnextv2-l_fpn_8xb4-1x_coco.py']

model = dict(backbone=dict(adapter={{_base_.convnextv2_fourierft_n3000}}))
