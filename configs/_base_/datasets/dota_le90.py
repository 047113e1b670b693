# DOTA-v1.0 oriented detection on 1024x1024 patches (mmrotate 1.x's dota settings), split
# single-scale with tools/data/dota_split.py --patch-size 1024 --gap 200 into
# data/split_ss_dota/{trainval,test}. Batch 16 = 8 GPUs x 2 (FLoRA paper, Table 9).
# Boxes load as quadrilaterals (qbox) and become rotated boxes (rbox); the angle
# convention (le90, `angle_version` in the model config) is applied by the model's coders.
dataset_type = 'DOTADataset'
data_root = 'data/split_ss_dota/'
backend_args = None

train_pipeline = [
    dict(type='mmdet.LoadImageFromFile', backend_args=backend_args),
    dict(type='mmdet.LoadAnnotations', with_bbox=True, box_type='qbox'),
    dict(type='ConvertBoxType', box_type_mapping=dict(gt_bboxes='rbox')),
    dict(type='mmdet.Resize', scale=(1024, 1024), keep_ratio=True),
    dict(type='mmdet.RandomFlip', prob=0.75, direction=['horizontal', 'vertical', 'diagonal']),
    dict(type='mmdet.PackDetInputs'),
]
val_pipeline = [
    dict(type='mmdet.LoadImageFromFile', backend_args=backend_args),
    dict(type='mmdet.Resize', scale=(1024, 1024), keep_ratio=True),
    # annotations after Resize: boxes stay in the patch's original frame
    dict(type='mmdet.LoadAnnotations', with_bbox=True, box_type='qbox'),
    dict(type='ConvertBoxType', box_type_mapping=dict(gt_bboxes='rbox')),
    dict(type='mmdet.PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
test_pipeline = [
    dict(type='mmdet.LoadImageFromFile', backend_args=backend_args),
    dict(type='mmdet.Resize', scale=(1024, 1024), keep_ratio=True),
    dict(type='mmdet.PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]

train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='trainval/annfiles/',
        data_prefix=dict(img_path='trainval/images/'),
        filter_cfg=dict(filter_empty_gt=True),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='trainval/annfiles/',
        data_prefix=dict(img_path='trainval/images/'),
        test_mode=True,
        pipeline=val_pipeline))
# As in mmrotate, validation runs on trainval patches: DOTA's test labels are private.
test_dataloader = val_dataloader

val_evaluator = dict(type='DOTAMetric', metric='mAP')
test_evaluator = val_evaluator

# Submission to the DOTA server: test patches (no annotations), detections merged back to
# the full images (patch names {image}__1.0__{x}___{y} carry the offsets).
# test_dataloader = dict(
#     batch_size=1, num_workers=2, persistent_workers=True, drop_last=False,
#     sampler=dict(type='DefaultSampler', shuffle=False),
#     dataset=dict(type=dataset_type, data_root=data_root,
#                  data_prefix=dict(img_path='test/images/'), test_mode=True,
#                  pipeline=test_pipeline))
# test_evaluator = dict(type='DOTAMetric', format_only=True, merge_patches=True,
#                       outfile_prefix='./work_dirs/dota/Task1')

# The learning rates in the schedules are for this total batch size.
auto_scale_lr = dict(enable=False, base_batch_size=16)
