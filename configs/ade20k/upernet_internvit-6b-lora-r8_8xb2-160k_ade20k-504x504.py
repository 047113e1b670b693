# FLoRA paper, Table 2: LoRA r = 8 (alpha 8) on every linear of every block, 0.32% of the
# backbone's parameters.
_base_ = ['./upernet_internvit-6b-lora-r16_8xb2-160k_ade20k-504x504.py']

model = dict(backbone=dict(adapter=dict(rank=8, alpha=8)))
paper = dict(params_pct=0.32)
