# FLoRA paper, Table 1, BitFit: only biases train, those of the layers the other rows
# adapt.
_base_ = ['../_base_/experiments/upernet_convnextv2-l_8xb2-160k_ade20k-512x512.py']

model = dict(backbone=dict(adapter={{_base_.convnextv2_bitfit}}))
paper = dict(table='1')
