# Weight decay by parameter, shared by every schedule (AdapterOptimWrapperConstructor keeps
# MMEngine's paramwise rules and merges groups with identical settings).
#
# Decay stays on the weights of the new parts (neck, heads), on full fine-tuning's weights,
# and on the factors of low-rank adapters (LoRA/DoRA A and B, FLoRA's factor matrices):
# on a product B·A it pulls ΔW toward zero, i.e. toward the pretrained weights, the
# regularisation decay is for. It is off for parameters that set a scale, not a weight:
# - norms and biases, as mmdet/mmseg's ConvNeXt and ViT configs do (InternViT-6B's RMSNorm
#   is not an nn.LayerNorm, hence 'norm'), BitFit's bias deltas included;
# - DoRA's magnitude: it starts at ||W0|| per output channel; decay would shrink the
#   pretrained weights' norms, not ΔW;
# - FLoRA's core: it carries the scale of ΔW for all factor entries at once; decaying it
#   as well as the factors penalises the same ΔW twice;
# - spectral coefficients (FourierFT, FoRA): each is the amplitude of one global frequency
#   component of ΔW (times α), closer to a gain than to a weight entry;
# - position embeddings, class tokens and layer scales (full fine-tuning of ViTs).
adapter_paramwise_cfg = dict(
    norm_decay_mult=0.0,
    bias_decay_mult=0.0,
    custom_keys={
        'norm': dict(decay_mult=0.0),
        'bias_delta': dict(decay_mult=0.0),
        'magnitude': dict(decay_mult=0.0),
        '.core': dict(decay_mult=0.0),
        'coefficients': dict(decay_mult=0.0),
        'pos_embed': dict(decay_mult=0.0),
        'cls_token': dict(decay_mult=0.0),
        'position_embedding': dict(decay_mult=0.0),
        'class_embedding': dict(decay_mult=0.0),
        '.ls1': dict(decay_mult=0.0),
        '.ls2': dict(decay_mult=0.0),
    })
