# Which layers the adapters go into (regexes over the inner backbone's module names) and
# which new, randomly initialised backbone parts stay trainable (regexes over parameter
# names). "All backbone convs and linears" as in the FLoRA paper: stem, downsampling convs,
# depthwise 7x7 convs and both MLP linears of every ConvNeXt-V2 block (each has a bias, so
# the same list serves BitFit: it trains the biases of these layers).
convnextv2_targets = [
    r'stem\.0',
    r'stages\.\d+\.downsample\.1',
    r'stages\.\d+\.blocks\.\d+\.(conv_dw|mlp\.fc1|mlp\.fc2)',
]
convnextv2_trainable = [r'out_norms\..*']

# Every linear of every ViT / InternViT block.
vit_targets = [r'blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)']
internvit6b_targets = [r'encoder\.layers\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)']
# InternViT-6B's qkv has no bias: BitFit tunes the biases of the other three.
internvit6b_bias_targets = [r'encoder\.layers\.\d+\.(attn\.proj|mlp\.fc1|mlp\.fc2)']
vit_trainable = [r'pyramid\..*']

# Query and value only, the FourierFT and FoRA papers' ViT setting: timm computes q, k, v
# with one fused Linear of 3 x 1024 output rows; the adapter covers row blocks 0 (q) and 2 (v).
vit_qv_targets = [r'blocks\.\d+\.attn\.qkv']
qv_row_blocks = dict(split=3, use=(0, 2))
