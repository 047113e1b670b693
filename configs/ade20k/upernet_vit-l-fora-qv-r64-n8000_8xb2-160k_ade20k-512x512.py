# FoRA as its paper fine-tunes ViTs: query and value only, n = 8000 coefficients per factor.
# timm's ViT computes q, k, v with one fused Linear (3 x 1024 rows): row blocks 0 and 2 of
# it get one FoRA each, k is left alone.
_base_ = ['./upernet_vit-l-fora-r64-n8000_8xb2-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        adapter=dict(targets={{_base_.vit_qv_targets}}, row_blocks={{_base_.qv_row_blocks}})))
