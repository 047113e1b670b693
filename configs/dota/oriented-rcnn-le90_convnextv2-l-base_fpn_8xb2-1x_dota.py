# FLoRA paper, Table 1, "Base": the frozen backbone without adapter; only its new output
# norms, the neck and the heads train.
_base_ = ['../_base_/experiments/oriented-rcnn-le90_convnextv2-l_fpn_8xb2-1x_dota.py']

custom_hooks = [dict(type='AdapterHook')]
paper = dict(table='1')
