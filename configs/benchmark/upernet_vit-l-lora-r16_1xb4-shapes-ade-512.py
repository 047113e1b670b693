# Throughput through the Runner of the ADE20K ViT-L/16 LoRA row on generated data (no ADE20K
# here): the real UperNet at 512x512 crops, batch 4 on one GPU, bf16 AMP, no pretrained
# weights, no validation. Compare the backbone's execution switches by the logged time/iter:
#   python tools/data/generate_shapes.py --task ade --out data/shapes_ade_512 --size 512 512
#   python tools/train.py <this file> --amp                                          # eager
#   python tools/train.py <this file> --amp --cfg-options model.backbone.compile=True
#   python tools/train.py <this file> --amp --cfg-options model.backbone.cuda_graph=True
_base_ = ['../ade20k/upernet_vit-l-lora-r16_8xb2-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(backbone=dict(init_cfg=None), frozen_dtype='bfloat16'),
    decode_head=dict(num_classes=4),
    auxiliary_head=dict(num_classes=4))
metainfo = dict(
    classes=('background', 'square', 'circle', 'triangle'),
    palette=[[90, 90, 90], [220, 40, 40], [40, 200, 40], [30, 90, 220]])
train_dataloader = dict(
    batch_size=4,
    dataset=dict(
        type='BaseSegDataset',
        data_root='data/shapes_ade_512',
        metainfo=metainfo,
        img_suffix='.jpg',
        seg_map_suffix='.png',
        reduce_zero_label=True))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=100, val_interval=1000)
val_cfg = None
val_dataloader = None
val_evaluator = None
test_cfg = None
test_dataloader = None
test_evaluator = None
param_scheduler = [dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=0, end=100)]
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(by_epoch=False, interval=1000))
custom_hooks = [dict(type='AdapterHook')]
