# FLoRA paper, Table 1, "Base": the frozen backbone without adapter; only its new output
# norms, the neck and the heads train.
_base_ = ['../_base_/experiments/upernet_convnextv2-l_8xb2-160k_ade20k-512x512.py']

custom_hooks = [dict(type='AdapterHook')]
paper = dict(table='1')
