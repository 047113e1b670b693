# ConvNeXt-V2-L: COCO instance segmentation, Mask R-CNN 1x (12 epochs), AdamW lr 1e-4, wd 0.05,
# batch 32 = 8 GPUs x 4 (FLoRA paper, Table 9).
# FLoRA paper, Table 1, "Fully FT": the plain backbone, every parameter trains.
_base_ = [
    '../_base_/models/mask-rcnn_convnextv2-l_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/coco_1x_adamw.py',
    '../_base_/default_runtime_det.py',
]

# The model of the base files as it is: a plain backbone, nothing frozen.
custom_hooks = [dict(type='TrainableReportHook')]
paper = dict(table='1')
