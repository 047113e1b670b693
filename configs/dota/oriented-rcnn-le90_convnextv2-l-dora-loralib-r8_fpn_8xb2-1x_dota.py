# FLoRA paper, Table 1: DoRA r = 8: the LoRA r = 8 row (loralib factors) with DoRA's
# learned magnitude per output channel; the paper gives it LoRA's budget.
_base_ = ['./oriented-rcnn-le90_convnextv2-l-lora-loralib-r8_fpn_8xb2-1x_dota.py']

model = dict(backbone=dict(adapter=dict(type='DoRA')))
