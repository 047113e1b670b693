# FLoRA paper, Table 1: LoRA r = 32 with loralib's ConvLoRA factors.
_base_ = ['./oriented-rcnn-le90_convnextv2-l-lora-loralib-r8_fpn_8xb2-1x_dota.py']

model = dict(backbone=dict(adapter=dict(rank=32, alpha=32)))
paper = dict(params_m=51.78)
