# FLoRA paper, Table 2: FLoRA with an 8x8 core on every linear of every block, s = 0.04,
# 0.32% of the backbone's parameters.
_base_ = ['./upernet_internvit-6b-flora-r16_8xb2-160k_ade20k-504x504.py']

model = dict(backbone=dict(adapter=dict(rank=8)))
paper = dict(params_pct=0.32)
