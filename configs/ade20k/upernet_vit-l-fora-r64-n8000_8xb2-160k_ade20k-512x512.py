# FoRA on every linear of every block: LoRA factors of rank 64, each the real inverse DFT of
# 8000 learnable spectral coefficients (16000 parameters per layer at any rank). The
# paper's own ViT setting (query and value only):
# upernet_vit-l-fora-qv-r64-n8000_8xb2-160k_ade20k-512x512.py.
_base_ = ['../_base_/experiments/upernet_vit-l_8xb2-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        adapter=dict(
            type='FoRA', rank=64, n=8000, scale=1.0, seed=777, targets={{_base_.vit_targets}})))
