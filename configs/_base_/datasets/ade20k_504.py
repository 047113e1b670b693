# ADE20K at 504x504 for patch-14 backbones (InternViT-6B), as InternVL's own ADE20K configs
# (segmentation/configs/_base_/datasets/ade20k_504x504.py): crops of 36 x 36 patches; images
# resized with short side 504 (long side up to 2016), at test time also to a multiple of 14.
# Everything else as ade20k_512.py.
_base_ = ['./ade20k_512.py']

crop_size = (504, 504)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(2016, 504), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2016, 504), keep_ratio=True),
    dict(type='ResizeToMultiple', size_divisor=14),
    # annotations after Resize: the metric compares with the original-size ground truth
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
