# FourierFT, 3000 coefficients per layer, α = 150.
_base_ = ['../_base_/experiments/oriented-rcnn-le90_convnextv2-l_fpn_8xb2-1x_dota.py']

model = dict(backbone=dict(adapter={{_base_.convnextv2_fourierft_n3000}}))
