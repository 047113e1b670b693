# FLoRA, core rank 16 on the channel modes, 2 on the spatial ones, s = 4.
_base_ = ['../_base_/experiments/mask-rcnn_convnextv2-l_fpn_8xb4-1x_coco.py']

model = dict(backbone=dict(adapter={{_base_.convnextv2_flora_r16}}))
