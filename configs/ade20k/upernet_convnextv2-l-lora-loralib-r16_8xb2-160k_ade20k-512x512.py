# FLoRA paper, Table 1: LoRA r = 16 with loralib's ConvLoRA factors.
_base_ = ['./upernet_convnextv2-l-lora-loralib-r8_8xb2-160k_ade20k-512x512.py']

model = dict(backbone=dict(adapter=dict(rank=16, alpha=16)))
paper = dict(params_m=25.89)
