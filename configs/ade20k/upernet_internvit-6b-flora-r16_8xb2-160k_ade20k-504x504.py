# FLoRA paper, Table 2: FLoRA with a 16x16 core on every linear of every block, s = 0.04,
# 0.66% of the backbone's parameters.
_base_ = ['./upernet_internvit-6b-flora-r32_8xb2-160k_ade20k-504x504.py']

model = dict(backbone=dict(adapter=dict(rank=16)))
paper = dict(table='2', params_pct=0.66)
