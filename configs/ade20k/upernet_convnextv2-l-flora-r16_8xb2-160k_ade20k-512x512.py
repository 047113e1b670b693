# FLoRA, core rank 16 on the channel modes, 2 on the spatial ones, s = 4.
_base_ = ['../_base_/experiments/upernet_convnextv2-l_8xb2-160k_ade20k-512x512.py']

model = dict(backbone=dict(adapter={{_base_.convnextv2_flora_r16}}))
