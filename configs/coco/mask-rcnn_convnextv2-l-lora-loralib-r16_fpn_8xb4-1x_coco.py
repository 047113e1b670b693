# FLoRA paper, Table 1: LoRA r = 16 with loralib's ConvLoRA factors.
_base_ = ['./mask-rcnn_convnextv2-l-lora-loralib-r8_fpn_8xb4-1x_coco.py']

model = dict(backbone=dict(adapter=dict(rank=16, alpha=16)))
paper = dict(params_m=25.89)
