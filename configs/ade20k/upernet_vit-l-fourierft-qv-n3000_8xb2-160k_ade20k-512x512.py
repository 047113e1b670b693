# FourierFT as its paper fine-tunes ViTs: query and value only, n = 3000 coefficients per
# adapted matrix, α = 300. timm's ViT computes q, k, v with one fused Linear (3 x 1024 rows):
# row blocks 0 and 2 of it get one FourierFT each, k is left alone.
_base_ = ['./upernet_vit-l-fourierft-n3000_8xb2-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        adapter=dict(
            alpha=300.0,
            targets={{_base_.vit_qv_targets}},
            row_blocks={{_base_.qv_row_blocks}})))
