# FLoRA paper, Table 2: DoRA r = 16: the LoRA r = 16 row with DoRA's learned magnitude per
# output channel.
_base_ = ['./upernet_internvit-6b-lora-r16_8xb2-160k_ade20k-504x504.py']

model = dict(backbone=dict(adapter=dict(type='DoRA')))
