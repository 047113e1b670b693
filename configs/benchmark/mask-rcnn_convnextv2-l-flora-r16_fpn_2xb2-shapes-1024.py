# Throughput / DDP-correctness run of the COCO FLoRA experiment on generated data (no COCO
# here): the real model at 1024x1024, shapes from tools/data/generate_shapes.py --task coco
# --size 512 512 upscaled, no pretrained weights, no validation; AdapterSyncCheckHook fails
# the run if any rank's adapters (weights or spectral entries) differ at the end.
#   bash tools/dist_train.sh configs/benchmark/<this file> 2
_base_ = ["../coco/mask-rcnn_convnextv2-l-flora-r16_fpn_8xb4-1x_coco.py"]

data_root = "data/shapes_coco_1024/"
model = dict(backbone=dict(backbone=dict(init_cfg=None)))
train_dataloader = dict(
    batch_size=2,
    num_workers=4,
    dataset=dict(
        _delete_=True,
        type="CocoDataset",
        data_root=data_root,
        metainfo=dict(classes=("square", "circle", "triangle")),
        ann_file="annotations/instances_train.json",
        data_prefix=dict(img="train/"),
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=[
            dict(type="LoadImageFromFile"),
            dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
            dict(type="Resize", scale=(1024, 1024), keep_ratio=True),
            dict(type="RandomFlip", prob=0.5),
            dict(type="PackDetInputs"),
        ],
    ),
)
train_cfg = dict(max_epochs=1, val_interval=100)
val_cfg = None
val_dataloader = None
val_evaluator = None
test_cfg = None
test_dataloader = None
test_evaluator = None
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=100))
custom_hooks = [dict(type="AdapterHook"), dict(type="AdapterSyncCheckHook")]
