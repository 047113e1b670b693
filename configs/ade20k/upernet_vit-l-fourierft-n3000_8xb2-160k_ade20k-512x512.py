# FourierFT (Gao et al., ICML 2024) on every linear of every block: ΔW = α·Re(IDFT2(F)) with
# 3000 learnable coefficients per layer; α is task-sensitive (peft's default 150): tune it
# per task. The paper's own ViT setting (query and value only, α = 300):
# upernet_vit-l-fourierft-qv-n3000_8xb2-160k_ade20k-512x512.py.
_base_ = ['../_base_/experiments/upernet_vit-l_8xb2-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        adapter=dict(
            type='FourierFT', n=3000, alpha=150.0, seed=777, targets={{_base_.vit_targets}})))
