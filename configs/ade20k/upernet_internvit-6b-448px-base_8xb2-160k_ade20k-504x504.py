# As upernet_internvit-6b-base_8xb2-160k_ade20k-504x504.py, from a 448 px release
# (InternViT-6B-448px-V1-2 / V1-5 / V2-5, converted with tools/convert/internvit6b_to_mm.py):
# 45 layers, outputs of blocks 12, 23, 34 and 45, a 32 x 32 position grid.
_base_ = ['./upernet_internvit-6b-base_8xb2-160k_ade20k-504x504.py']

model = dict(backbone=dict(backbone={{_base_.internvit_6b_448px}}))
