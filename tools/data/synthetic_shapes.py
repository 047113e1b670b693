"""Generated toy datasets (coloured shapes on noise) in COCO, ADE20K and DOTA layouts.

They exist so that demos and tests run the stock OpenMMLab datasets and pipelines end to
end without downloads. Every image is drawn from its own seeded generator
``default_rng([seed, split, index])``: the same seed gives the same files, and image ``i``
does not depend on how many images are generated.

Each class has its own shape *and* colour, so a tiny detector learns it in minutes on a CPU.
Images are written with OpenCV (BGR); colours below are BGR.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mm_spectral.state import atomic_write_text

from .dota_patches import DotaObject, polygon_area, write_dota_ann

SHAPES_CLASSES = ("square", "circle", "triangle")
SHAPES_COLOURS = {"square": (40, 40, 220), "circle": (40, 200, 40), "triangle": (220, 90, 30)}

# ADE-style label files: 0 = void (ignored), 1 = background, 2.. = shapes. With
# reduce_zero_label=True (as for ADE20K) mmseg maps 0 -> 255, 1 -> 0, k -> k - 1, so the
# trained classes are SHAPES_ADE_CLASSES in this order.
SHAPES_ADE_CLASSES = ("background",) + SHAPES_CLASSES
ADE_VOID, ADE_BACKGROUND = 0, 1

# Names from mmrotate's DOTADataset METAINFO, so the stock dataset loads the files.
# (aspect-ratio range long/short, BGR colour)
SHAPES_DOTA_CLASSES = ("plane", "ship", "large-vehicle")
DOTA_STYLE = {
    "plane": ((1.0, 1.3), (40, 40, 220)),
    "ship": ((3.0, 4.5), (220, 90, 30)),
    "large-vehicle": ((1.8, 2.4), (40, 210, 230)),
}

SPLITS = ("train", "val")
_SPLIT_IDS = {"train": 0, "val": 1}
_SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point shift: polygons are drawn at 1/16 px


@dataclass
class Shape:
    """One drawn object: class name and its outline (k, 2) in pixel coordinates (x, y)."""

    name: str
    polygon: np.ndarray


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def noisy_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A dull random colour with a soft gradient and Gaussian noise, uint8 BGR (h, w, 3)."""
    base = rng.uniform(60, 140, size=3)
    ramp = np.linspace(-1.0, 1.0, width)[None, :, None] * rng.uniform(-20, 20, size=3)
    noise = rng.normal(0.0, 12.0, size=(height, width, 3))
    return np.clip(base + ramp + noise, 0, 255).astype(np.uint8)


def _rotated(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def shape_outline(name: str, size: float, angle: float) -> np.ndarray:
    """Outline of a class's shape centred at the origin; ``size`` is its width in pixels."""
    if name == "square":
        half = size / 2
        points = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
        return _rotated(points, angle)
    if name == "circle":
        t = np.linspace(0.0, 2 * math.pi, 32, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1) * (size / 2)
    if name == "triangle":
        t = angle + np.array([-math.pi / 2, math.pi / 6, 5 * math.pi / 6])
        return np.stack([np.cos(t), np.sin(t)], axis=1) * (size / math.sqrt(3))
    raise ValueError(f"unknown shape {name!r}; known: {SHAPES_CLASSES}")


def rotated_rectangle(cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    """Corners (4, 2) of a w x h rectangle turned by ``angle`` (radians), clockwise on screen."""
    half = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
    return _rotated(half, angle) + np.array([cx, cy])


def _place(
    rng: np.random.Generator, outline: np.ndarray, width: int, height: int, taken: list, margin: int
) -> np.ndarray | None:
    """Move ``outline`` to a random spot fully inside the image whose box, grown by
    ``margin``, overlaps no box in ``taken``; None after 50 tries."""
    lo, hi = outline.min(0), outline.max(0)
    if hi[0] - lo[0] + 2 * margin > width or hi[1] - lo[1] + 2 * margin > height:
        return None
    for _ in range(50):
        cx = rng.uniform(margin - lo[0], width - margin - hi[0])
        cy = rng.uniform(margin - lo[1], height - margin - hi[1])
        box = np.array([cx + lo[0], cy + lo[1], cx + hi[0], cy + hi[1]])
        if all(
            box[0] > t[2] + margin
            or box[2] < t[0] - margin
            or box[1] > t[3] + margin
            or box[3] < t[1] - margin
            for t in taken
        ):
            taken.append(box)
            return outline + np.array([cx, cy])
    return None


def _fit(size: tuple[float, float], width: int, height: int) -> tuple[float, float]:
    """Size range capped at half the shorter image side, so small images still get shapes."""
    cap = min(width, height) / 2
    return min(size[0], cap), min(size[1], cap)


def random_shapes(
    rng: np.random.Generator,
    width: int,
    height: int,
    classes: Sequence[str] = SHAPES_CLASSES,
    count: tuple[int, int] = (1, 4),
    size: tuple[float, float] = (16, 60),
) -> list[Shape]:
    """1-4 non-overlapping shapes (COCO/ADE sets), each 16-60 px wide (at most half the
    shorter image side), fully inside."""
    shapes: list[Shape] = []
    taken: list[np.ndarray] = []
    size = _fit(size, width, height)
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        name = classes[int(rng.integers(len(classes)))]
        side = rng.uniform(*size)
        angle = rng.uniform(-math.pi / 9, math.pi / 9)
        polygon = _place(rng, shape_outline(name, side, angle), width, height, taken, margin=2)
        if polygon is not None:  # 2 decimals, as written to the annotation files
            shapes.append(Shape(name, np.round(polygon, 2)))
    return shapes


def random_rotated_boxes(
    rng: np.random.Generator,
    width: int,
    height: int,
    classes: Sequence[str] = SHAPES_DOTA_CLASSES,
    count: tuple[int, int] = (1, 4),
    size: tuple[float, float] = (16, 60),
) -> list[Shape]:
    """1-4 non-overlapping rotated rectangles; long side 16-60 px, aspect set by class."""
    shapes: list[Shape] = []
    taken: list[np.ndarray] = []
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        name = classes[int(rng.integers(len(classes)))]
        (ar_lo, ar_hi), _ = DOTA_STYLE[name]
        size = _fit(size, width, height)
        long_side = rng.uniform(*size)
        short_side = max(long_side / rng.uniform(ar_lo, ar_hi), 6.0)
        outline = rotated_rectangle(0.0, 0.0, long_side, short_side, rng.uniform(0, math.pi))
        polygon = _place(rng, outline, width, height, taken, margin=2)
        if polygon is not None:  # 2 decimals, as written to the annotation files
            shapes.append(Shape(name, np.round(polygon, 2)))
    return shapes


def fill_polygon(canvas: np.ndarray, polygon: np.ndarray, value) -> None:
    """Draw a filled polygon at sub-pixel precision (the same call makes images and masks)."""
    points = np.round(polygon * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(canvas, [points], value, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)


def _colour(rng: np.random.Generator, bgr: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in bgr)


def render(rng: np.random.Generator, width: int, height: int, shapes: list[Shape], palette: dict):
    """Noisy background with every shape filled in its class colour (jittered)."""
    img = noisy_background(rng, width, height)
    for shape in shapes:
        fill_polygon(img, shape.polygon, _colour(rng, palette[shape.name]))
    return img


def shape_mask(shape: Shape, width: int, height: int) -> np.ndarray:
    """Binary uint8 mask (h, w) of one shape, rasterised exactly as it was drawn."""
    mask = np.zeros((height, width), np.uint8)
    fill_polygon(mask, shape.polygon, 1)
    return mask


def _write_image(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix == ".jpg" else []
    if not cv2.imwrite(str(path), img, params):
        raise OSError(f"could not write {path}")


def make_shapes_coco(
    root: str | Path,
    num_train: int = 64,
    num_val: int = 16,
    img_size: tuple[int, int] = (128, 128),
    seed: int = 0,
) -> dict[str, Path]:
    """COCO instance segmentation set: root/{train,val}/NNNNNN.png and
    root/annotations/instances_{train,val}.json (polygon segmentation, bbox [x, y, w, h],
    area = polygon area, category ids 1..3). ``img_size`` is (width, height).

    Returns the annotation file of each split.
    """
    root, (width, height) = Path(root), img_size
    categories = [
        {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPES_CLASSES)
    ]
    cat_ids = {c["name"]: c["id"] for c in categories}
    out = {}
    for split, num in zip(SPLITS, (num_train, num_val)):
        images, annotations = [], []
        for i in range(num):
            rng = _rng(seed, split, i)
            shapes = random_shapes(rng, width, height)
            file_name = f"{i:06d}.png"
            _write_image(
                root / split / file_name, render(rng, width, height, shapes, SHAPES_COLOURS)
            )
            images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
            for shape in shapes:
                x0, y0 = shape.polygon.min(0)
                x1, y1 = shape.polygon.max(0)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": cat_ids[shape.name],
                        "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                        "area": round(polygon_area(shape.polygon), 2),
                        "iscrowd": 0,
                        "segmentation": [[round(float(v), 2) for v in shape.polygon.reshape(-1)]],
                    }
                )
        ann_file = root / "annotations" / f"instances_{split}.json"
        coco = {"images": images, "annotations": annotations, "categories": categories}
        atomic_write_text(json.dumps(coco), ann_file)  # its presence means "generated"
        out[split] = ann_file
    return out


def ade_label_map(shapes: list[Shape], width: int, height: int) -> np.ndarray:
    """Label file content: 1 = background, 2 + class index = shape, 0 = a one-pixel void
    band on every shape boundary (edge pixels are ambiguous, as in VOC's void borders)."""
    labels = np.full((height, width), ADE_BACKGROUND, np.uint8)
    edges = np.zeros((height, width), np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    for shape in shapes:
        mask = shape_mask(shape, width, height)
        labels[mask > 0] = SHAPES_ADE_CLASSES.index(shape.name) + 1
        edges |= cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, kernel)
    labels[edges > 0] = ADE_VOID
    return labels


def make_shapes_ade(
    root: str | Path,
    num_train: int = 64,
    num_val: int = 16,
    img_size: tuple[int, int] = (128, 128),
    seed: int = 0,
) -> dict[str, Path]:
    """ADE20K-layout semantic segmentation set: root/images/{training,validation}/*.jpg and
    root/annotations/{training,validation}/*.png (uint8 ids, see :func:`ade_label_map`).

    Load with ``reduce_zero_label=True``: 0 -> 255 (ignored), 1 -> 0 'background',
    2 -> 1 'square', 3 -> 2 'circle', 4 -> 3 'triangle'. Returns each split's image folder.
    """
    root, (width, height) = Path(root), img_size
    out = {}
    for split, folder, num in zip(SPLITS, ("training", "validation"), (num_train, num_val)):
        for i in range(num):
            rng = _rng(seed, split, i)
            shapes = random_shapes(rng, width, height)
            stem = f"shapes_{split}_{i:06d}"
            img = render(rng, width, height, shapes, SHAPES_COLOURS)
            _write_image(root / "images" / folder / f"{stem}.jpg", img)
            _write_image(
                root / "annotations" / folder / f"{stem}.png", ade_label_map(shapes, width, height)
            )
        out[split] = root / "images" / folder
        out[split].mkdir(parents=True, exist_ok=True)
    return out


def make_shapes_dota(
    root: str | Path,
    num_train: int = 64,
    num_val: int = 16,
    img_size: tuple[int, int] = (256, 256),
    seed: int = 0,
) -> dict[str, Path]:
    """DOTA-layout oriented detection set: root/{train,val}/images/*.png and
    root/{train,val}/annfiles/*.txt, one ``x1 y1 ... x4 y4 class difficulty`` line per
    rotated rectangle (classes from mmrotate's DOTA list, difficulty 0).

    Returns each split's folder (a ``data_root`` for the splitter or DOTADataset).
    """
    root, (width, height) = Path(root), img_size
    palette = {name: colour for name, (_, colour) in DOTA_STYLE.items()}
    out = {}
    for split, num in zip(SPLITS, (num_train, num_val)):
        for i in range(num):
            rng = _rng(seed, split, i)
            boxes = random_rotated_boxes(rng, width, height)
            stem = f"S{i:04d}"
            _write_image(
                root / split / "images" / f"{stem}.png", render(rng, width, height, boxes, palette)
            )
            objects = [
                DotaObject(b.polygon, b.name, 0) for b in boxes if polygon_area(b.polygon) > 0
            ]
            write_dota_ann(root / split / "annfiles" / f"{stem}.txt", objects)
        out[split] = root / split
        (root / split / "annfiles").mkdir(parents=True, exist_ok=True)
    return out
