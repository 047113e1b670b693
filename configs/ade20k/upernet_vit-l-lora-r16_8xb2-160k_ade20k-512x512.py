# LoRA baseline on every linear of every block: rank 16, alpha 16.
_base_ = ['../_base_/experiments/upernet_vit-l_8xb2-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(adapter=dict(type='LoRA', rank=16, alpha=16, targets={{_base_.vit_targets}})))
