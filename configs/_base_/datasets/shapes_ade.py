# Generated shapes in ADE20K layout (tools/data/generate_shapes.py --task ade --out
# data/shapes_ade): 128x128 images, label files 0 = void, 1 = background, 2-4 = shapes;
# reduce_zero_label (as for ADE20K) makes them 255 (ignored), 0, 1-3.
# mmseg's ADE20KDataset only accepts subsets of its 150 class names, so the generated set
# uses its parent BaseSegDataset with ADE20K's file conventions (.jpg images, .png labels).
dataset_type = 'BaseSegDataset'
data_root = 'data/shapes_ade'
metainfo = dict(
    classes=('background', 'square', 'circle', 'triangle'),
    palette=[[90, 90, 90], [220, 40, 40], [40, 200, 40], [30, 90, 220]])
crop_size = (128, 128)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(512, 128), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(512, 128), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        img_suffix='.jpg',
        seg_map_suffix='.png',
        reduce_zero_label=True,
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        img_suffix='.jpg',
        seg_map_suffix='.png',
        reduce_zero_label=True,
        pipeline=test_pipeline))
test_dataloader = val_dataloader

val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

auto_scale_lr = dict(enable=False, base_batch_size=8)
