# FLoRA paper, Table 1, BitFit: only biases train, those of the layers the other rows
# adapt (stem, downsampling, depthwise 7x7 and MLP layers).
_base_ = ['../_base_/experiments/upernet_convnextv2-l_8xb2-160k_ade20k-512x512.py']

model = dict(backbone=dict(adapter=dict(type='BitFit', targets={{_base_.convnextv2_targets}})))
paper = dict(table='1')
