# FLoRA paper, Table 1: DoRA r = 32: the LoRA r = 32 row (loralib factors) with DoRA's
# learned magnitude per output channel; the paper gives it LoRA's budget.
_base_ = ['./mask-rcnn_convnextv2-l-lora-loralib-r32_fpn_8xb4-1x_coco.py']

model = dict(backbone=dict(adapter=dict(type='DoRA')))
