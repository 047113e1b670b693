# FLoRA, core rank 16 on the channel modes, 2 on the spatial ones, s = 4.
_base_ = ['../_base_/experiments/oriented-rcnn-le90_convnextv2-l_fpn_8xb2-1x_dota.py']

model = dict(backbone=dict(adapter={{_base_.convnextv2_flora_r16}}))
