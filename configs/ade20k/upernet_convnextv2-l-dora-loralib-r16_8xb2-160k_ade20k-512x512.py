# FLoRA paper, Table 1: DoRA r = 16: the LoRA r = 16 row (loralib factors) with DoRA's
# learned magnitude per output channel; the paper gives it LoRA's budget.
_base_ = ['./upernet_convnextv2-l-lora-loralib-r16_8xb2-160k_ade20k-512x512.py']

model = dict(backbone=dict(adapter=dict(type='DoRA')))
