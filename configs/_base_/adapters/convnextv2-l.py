# The adapters of the ConvNeXt-V2-L rows, shared by their COCO, ADE20K and DOTA configs
# (`model = dict(backbone=dict(adapter={{_base_.convnextv2_<name>}}))`); the layers are
# targets.py's: stem, downsampling convs, depthwise 7x7 convs and both MLP linears.
_base_ = ['./targets.py']

# BitFit: only the biases of those layers train.
convnextv2_bitfit = dict(type='BitFit', targets={{_base_.convnextv2_targets}})
# LoRA, rank 16, alpha 16; a conv's weight is the matrix (out, in/groups * kh * kw).
convnextv2_lora_r16 = dict(type='LoRA', rank=16, alpha=16, targets={{_base_.convnextv2_targets}})
# FLoRA (Si et al.): Tucker core of size 16 on the channel modes and 2 on the spatial modes,
# scale s = 4 (the paper's ConvNeXt setting).
convnextv2_flora_r16 = dict(
    type='FLoRA', rank=16, kernel_rank=2, scale=4.0, targets={{_base_.convnextv2_targets}})
# FourierFT (Gao et al., ICML 2024): ΔW = α·Re(IDFT2(F)) with 3000 learnable coefficients
# per layer; α is task-sensitive (peft's default 150): tune it per task.
convnextv2_fourierft_n3000 = dict(
    type='FourierFT', n=3000, alpha=150.0, seed=777, targets={{_base_.convnextv2_targets}})
# FoRA: LoRA factors of rank 64, each the real inverse DFT of 8000 learnable spectral
# coefficients (16000 parameters per layer at any rank).
convnextv2_fora_r64_n8000 = dict(
    type='FoRA', rank=64, n=8000, scale=1.0, seed=777, targets={{_base_.convnextv2_targets}})
