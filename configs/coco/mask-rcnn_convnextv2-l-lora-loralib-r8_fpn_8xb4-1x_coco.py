# FLoRA paper, Table 1: LoRA r = 8 with loralib's ConvLoRA factors (A: (r*k, in*k),
# B: (out/groups*k, r*k) for a k x k conv), the parameterisation the paper's budgets count.
_base_ = ['./mask-rcnn_convnextv2-l-lora-r16_fpn_8xb4-1x_coco.py']

model = dict(backbone=dict(adapter=dict(rank=8, alpha=8, conv_factors='loralib')))
paper = dict(table='1', params_m=12.94)
