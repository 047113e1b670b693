# FLoRA paper, Table 1: LoRA r = 32 with loralib's ConvLoRA factors.
_base_ = ['./upernet_convnextv2-l-lora-loralib-r8_8xb2-160k_ade20k-512x512.py']

model = dict(backbone=dict(adapter=dict(rank=32, alpha=32)))
paper = dict(params_m=51.78)
