# LoRA baseline, rank 16 (flat-matrix convs).
_base_ = ['../_base_/experiments/oriented-rcnn-le90_convnextv2-l_fpn_8xb2-1x_dota.py']

model = dict(backbone=dict(adapter={{_base_.convnextv2_lora_r16}}))
