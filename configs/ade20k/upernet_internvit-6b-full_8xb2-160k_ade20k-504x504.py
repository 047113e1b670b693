# FLoRA paper, Table 2, "Fully FT": InternViT-6B on ADE20K, UperNet on 504x504 crops, 160k
# iterations, AdamW lr 1e-4, wd 0.05, batch 16 = 8 GPUs x 2; the plain backbone, every
# parameter trains.
#
# Several GPUs needed: 5.9B trained parameters in float32 with their gradients and AdamW's
# two moments are 16 bytes each, ~95 GB before activations, more than one 80 GB GPU holds.
# MMEngine's FlexibleRunner shards them over the GPUs with FSDP (FULL_SHARD): ~12 GB per GPU
# on the 8 GPUs this file's name and batch assume. Each InternBlock is its own FSDP unit
# (mm_spectral's registered `frozen_apart_wrap_policy`), so a GPU holds one gathered block
# (~0.25 GB in bf16) at a time besides its shards; these are estimates from the sizes, not a
# measured run (tools/benchmark_fsdp.py measures it on GPUs). Launch:
#   bash tools/dist_train.sh configs/ade20k/upernet_internvit-6b-full_8xb2-160k_ade20k-504x504.py 8
_base_ = [
    '../_base_/models/upernet_internvit-6b.py',
    '../_base_/datasets/ade20k_504.py',
    '../_base_/schedules/ade20k_160k_adamw.py',
    '../_base_/default_runtime_seg.py',
]

runner_type = 'FlexibleRunner'
strategy = dict(
    type='FSDPStrategy',
    model_wrapper=dict(
        type='MMFullyShardedDataParallel',
        sharding_strategy='FULL_SHARD',
        use_orig_params=True,
        auto_wrap_policy=dict(type='frozen_apart_wrap_policy', module_classes=['InternBlock']),
        mixed_precision=dict(
            param_dtype='bfloat16', reduce_dtype='float32', buffer_dtype='float32')),
    # one full checkpoint, gathered on rank 0 (CPU): loads into the plain model
    state_dict_cfg='full')

# The model of the base files as it is: a plain backbone, nothing frozen.
custom_hooks = [dict(type='TrainableReportHook')]
paper = dict(table='2')
