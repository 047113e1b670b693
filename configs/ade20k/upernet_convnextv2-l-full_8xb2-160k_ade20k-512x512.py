# ConvNeXt-V2-L: ADE20K semantic segmentation, UperNet 512x512, 160k iterations, AdamW lr 1e-4,
# wd 0.05, batch 16 = 8 GPUs x 2 (FLoRA paper, Table 9).
# FLoRA paper, Table 1, "Fully FT": the plain backbone, every parameter trains.
_base_ = [
    '../_base_/models/upernet_convnextv2-l.py',
    '../_base_/datasets/ade20k_512.py',
    '../_base_/schedules/ade20k_160k_adamw.py',
    '../_base_/default_runtime_seg.py',
]

# The model of the base files as it is: a plain backbone, nothing frozen.
custom_hooks = [dict(type='TrainableReportHook')]
paper = dict(table='1')
