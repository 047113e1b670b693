# LoRA baseline, rank 16 (flat-matrix convs).
_base_ = ['../_base_/experiments/upernet_convnextv2-l_8xb2-160k_ade20k-512x512.py']

model = dict(backbone=dict(adapter={{_base_.convnextv2_lora_r16}}))
