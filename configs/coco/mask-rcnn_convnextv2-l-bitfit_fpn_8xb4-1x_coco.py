# FLoRA paper, Table 1, BitFit: only biases train, those of the layers the other rows
# adapt.
_base_ = ['../_base_/experiments/mask-rcnn_convnextv2-l_fpn_8xb4-1x_coco.py']

model = dict(backbone=dict(adapter={{_base_.convnextv2_bitfit}}))
paper = dict(table='1')
