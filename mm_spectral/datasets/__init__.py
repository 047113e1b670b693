"""Generated toy datasets and DOTA patch splitting (numpy + OpenCV; no OpenMMLab import)."""

from .dota_split import (
    DotaObject,
    clip_polygon,
    objects_in_window,
    patch_name,
    read_dota_ann,
    sliding_windows,
    split_dota,
    split_image,
    window_starts,
    write_dota_ann,
)
from .synthetic_shapes import (
    SHAPES_ADE_CLASSES,
    SHAPES_CLASSES,
    SHAPES_DOTA_CLASSES,
    make_shapes_ade,
    make_shapes_coco,
    make_shapes_dota,
)

__all__ = [
    "SHAPES_ADE_CLASSES",
    "SHAPES_CLASSES",
    "SHAPES_DOTA_CLASSES",
    "DotaObject",
    "clip_polygon",
    "make_shapes_ade",
    "make_shapes_coco",
    "make_shapes_dota",
    "objects_in_window",
    "patch_name",
    "read_dota_ann",
    "sliding_windows",
    "split_dota",
    "split_image",
    "window_starts",
    "write_dota_ann",
]
