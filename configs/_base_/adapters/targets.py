# Which layers the adapters go into (regexes over the inner backbone's module names) and
# which new, randomly initialised backbone parts stay trainable (regexes over parameter
# names). "All backbone convs and linears" as in the FLoRA paper: stem, downsampling convs,
# depthwise 7x7 convs and both MLP linears of every ConvNeXt-V2 block.
convnextv2_targets = [
    r'stem\.0',
    r'stages\.\d+\.downsample\.1',
    r'stages\.\d+\.blocks\.\d+\.(conv_dw|mlp\.fc1|mlp\.fc2)',
]
convnextv2_trainable = [r'out_norms\..*']

# Every linear of every ViT / InternViT block.
vit_targets = [r'blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)']
internvit6b_targets = [r'encoder\.layers\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)']
vit_trainable = [r'pyramid\..*']
