# FLoRA paper, Table 1: FLoRA at the paper's 40.49M budget: core rank 129 on the channel
# modes (the nearest count: 40.38M, -0.27%), kernel rank 2, s = 4.
_base_ = ['./mask-rcnn_convnextv2-l-flora-r16_fpn_8xb4-1x_coco.py']

model = dict(backbone=dict(adapter=dict(rank=129)))
paper = dict(table='1', params_m=40.49)
