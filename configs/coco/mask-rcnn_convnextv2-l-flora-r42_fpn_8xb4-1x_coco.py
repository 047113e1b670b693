# FLoRA paper, Table 1: FLoRA at the paper's 12.77M budget: core rank 42 on the channel
# modes (the nearest count: 12.84M, +0.55%), kernel rank 2, s = 4.
_base_ = ['./mask-rcnn_convnextv2-l-flora-r16_fpn_8xb4-1x_coco.py']

model = dict(backbone=dict(adapter=dict(rank=42)))
paper = dict(table='1', params_m=12.77)
