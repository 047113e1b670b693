# FLoRA paper, Table 2, "Base": the frozen backbone without adapter (head tuning); only
# its new pyramid and the heads train. No drop path: it would only add noise to features
# nothing learns from (InternVL's head-tuning configs use 0 too).
_base_ = ['../_base_/experiments/upernet_internvit-6b_8xb2-160k_ade20k-504x504.py']

model = dict(backbone=dict(backbone=dict(drop_path_rate=0.0)))
custom_hooks = [dict(type='AdapterHook')]
paper = dict(table='2')
