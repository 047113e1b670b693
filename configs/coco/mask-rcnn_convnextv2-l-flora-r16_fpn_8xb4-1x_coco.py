# FLoRA (Si et al.): Tucker core of size 16 on the channel modes and 2 on the spatial
# modes, scale s=4, on every backbone conv (stem, downsampling, depthwise) and linear.
_base_ = ['../_base_/experiments/mask-rcnn_convnextv2-l_fpn_8xb4-1x_coco.py']

model = dict(
    backbone=dict(
        adapter=dict(
            type='FLoRA',
            rank=16,
            kernel_rank=2,
            scale=4.0,
            targets={{_base_.convnextv2_targets}})))
