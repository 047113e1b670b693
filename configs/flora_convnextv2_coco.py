# The entry point of the README: ConvNeXt-V2-L + FLoRA Mask R-CNN on COCO.
#   python tools/train.py configs/flora_convnextv2_coco.py
_base_ = ['./coco/mask-rcnn_convnextv2-l-flora-r16_fpn_8xb4-1x_coco.py']
