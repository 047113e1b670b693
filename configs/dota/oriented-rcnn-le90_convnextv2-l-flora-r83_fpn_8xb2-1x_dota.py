# FLoRA paper, Table 1: FLoRA at the paper's 25.65M budget: core rank 83 on the channel
# modes (the nearest count: 25.66M, +0.04%), kernel rank 2, s = 4.
_base_ = ['./oriented-rcnn-le90_convnextv2-l-flora-r16_fpn_8xb2-1x_dota.py']

model = dict(backbone=dict(adapter=dict(rank=83)))
paper = dict(table='1', params_m=25.65)
