# FLoRA paper, Table 2, BitFit: only biases train, those of every block's attention
# projection and MLP linears (qkv has none).
_base_ = ['../_base_/experiments/upernet_internvit-6b_8xb2-160k_ade20k-504x504.py']

model = dict(
    backbone=dict(adapter=dict(type='BitFit', targets={{_base_.internvit6b_bias_targets}})))
paper = dict(table='2')
