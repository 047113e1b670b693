# FLoRA paper, Table 2: LoRA r = 16 (alpha 16) on every linear of every block, 0.66% of the
# backbone's parameters.
_base_ = ['../_base_/experiments/upernet_internvit-6b_8xb2-160k_ade20k-504x504.py']

model = dict(
    backbone=dict(
        adapter=dict(type='LoRA', rank=16, alpha=16, targets={{_base_.internvit6b_targets}})))
paper = dict(table='2', params_pct=0.66)
