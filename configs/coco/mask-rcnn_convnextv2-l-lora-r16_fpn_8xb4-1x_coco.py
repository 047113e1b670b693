# LoRA baseline, rank 16 (flat-matrix convs).
_base_ = ['../_base_/experiments/mask-rcnn_convnextv2-l_fpn_8xb4-1x_coco.py']

model = dict(backbone=dict(adapter={{_base_.convnextv2_lora_r16}}))
