# FourierFT, 3000 coefficients per layer, α = 150.
_base_ = ['../_base_/experiments/upernet_convnextv2-l_8xb2-160k_ade20k-512x512.py']

model = dict(backbone=dict(adapter={{_base_.convnextv2_fourierft_n3000}}))
