# FLoRA (Si et al.): Tucker core 32x32 on every linear of every block, scale s = 0.04 (the
# FLoRA paper's InternViT-6B setting); above the paper's two budgets (r = 8 and 16 rows).
_base_ = ['../_base_/experiments/upernet_internvit-6b_8xb2-160k_ade20k-504x504.py']

model = dict(
    backbone=dict(adapter=dict(type='FLoRA', rank=32, scale=0.04, targets={{_base_.internvit6b_targets}})))
