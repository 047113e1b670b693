# FoRA, rank 64, 8000 coefficients per factor.
_base_ = ['../_base_/experiments/upernet_convnextv2-l_8xb2-160k_ade20k-512x512.py']

model = dict(backbone=dict(adapter={{_base_.convnextv2_fora_r64_n8000}}))
