# FLoRA paper, Table 2: DoRA r = 8: the LoRA r = 8 row with DoRA's learned magnitude per
# output channel.
_base_ = ['./upernet_internvit-6b-lora-r8_8xb2-160k_ade20k-504x504.py']

model = dict(backbone=dict(adapter=dict(type='DoRA')))
