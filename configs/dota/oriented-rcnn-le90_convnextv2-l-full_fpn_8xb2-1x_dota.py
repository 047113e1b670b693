# ConvNeXt-V2-L: DOTA-v1.0 oriented detection, Oriented R-CNN le90, 12 epochs, SGD lr 5e-3, wd 1e-4,
# batch 16 = 8 GPUs x 2 (FLoRA paper, Table 9); data split with tools/data/dota_split.py.
# FLoRA paper, Table 1, "Fully FT": the plain backbone, every parameter trains.
_base_ = [
    '../_base_/models/oriented-rcnn-le90_convnextv2-l_fpn.py',
    '../_base_/datasets/dota_le90.py',
    '../_base_/schedules/dota_1x_sgd.py',
    '../_base_/default_runtime_rotated.py',
]

# The model of the base files as it is: a plain backbone, nothing frozen.
custom_hooks = [dict(type='TrainableReportHook')]
paper = dict(table='1')
