# ConvNeXt-V2-L: DOTA-v1.0 oriented detection, Oriented R-CNN le90, 12 epochs, SGD lr 5e-3, wd 1e-4,
# batch 16 = 8 GPUs x 2 (FLoRA paper, Table 9); data split with tools/data/dota_split.py.
# FLoRA (Si et al.): Tucker core of size 16 on the channel modes and 2 on the spatial
# modes, scale s=4, on every backbone conv (stem, downsampling, depthwise) and linear.
_base_ = [
    '../_base_/models/oriented-rcnn-le90_convnextv2-l_fpn.py',
    '../_base_/datasets/dota_le90.py',
    '../_base_/schedules/dota_1x_sgd.py',
    '../_base_/default_runtime_rotated.py',
    '../_base_/adapters/targets.py',
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='AdaptedBackbone',
        backbone={{_base_.convnextv2_l}},
        adapter=dict(type='FLoRA', rank=16, kernel_rank=2, scale=4.0, targets={{_base_.convnextv2_targets}}),
        trainable={{_base_.convnextv2_trainable}}))

custom_hooks = [dict(type='AdapterHook'), dict(type='DeltaStatsHook', interval=50)]
