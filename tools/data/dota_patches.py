"""Cut large DOTA images into overlapping square patches, with their annotations.

Conventions follow the DOTA devkit (``ImgSplit``), which mmrotate 1.x's package lacks:

- windows of ``patch_size`` slide by ``step = patch_size - gap``; the last window on each
  axis is moved back to end at the image edge (``start = size - patch_size``); an image
  smaller than a patch gives one window at 0, zero-padded to ``patch_size``;
- a rate != 1 resizes the image (bicubic) and its polygons first; patch coordinates are in
  the resized frame (to merge detections back, divide by the rate);
- patch names are ``{image}__{rate}__{x}___{y}`` (e.g. ``P0001__1.0__824___0``), which
  mmrotate's DOTAMetric(merge_patches=True) parses back to the offset (x, y);
- every polygon is clipped to its window. An object is kept when clipped area / own area
  (its "iof") >= ``iof_thr`` (0.7) with its own difficulty. Objects inside less than that
  are dropped (as mmrotate's BboxToolkit-based splitter does), or, with
  ``partial_difficulty=2``, kept clipped and marked difficulty 2 (as the DOTA devkit does).
  A clipped polygon with more than four corners is reduced to four by repeatedly removing
  the corner whose removal loses the least area, so it stays inside its patch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np

try:  # mmrotate depends on shapely; the clip below is the fallback
    from shapely.geometry import Polygon as _ShapelyPolygon
    from shapely.geometry import box as _shapely_box
except ImportError:  # pragma: no cover - exercised through use_shapely=False
    _ShapelyPolygon = None

IMG_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
ANN_DIRS = ("annfiles", "labelTxt")


@dataclass
class DotaObject:
    """One DOTA annotation: a polygon (k, 2) of (x, y) corners, its class and difficulty."""

    poly: np.ndarray
    name: str
    difficulty: int = 0


def read_dota_ann(path: str | Path) -> list[DotaObject]:
    """Parse a DOTA txt file; header lines (``imagesource:``, ``gsd:``) are skipped."""
    objects = []
    for line in Path(path).read_text().splitlines():
        tokens = line.split()
        if len(tokens) < 9:
            continue
        poly = np.array([float(v) for v in tokens[:8]]).reshape(4, 2)
        difficulty = int(tokens[9]) if len(tokens) > 9 else 0
        objects.append(DotaObject(poly, tokens[8], difficulty))
    return objects


def _fmt(value: float) -> str:
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def write_dota_ann(path: str | Path, objects: Sequence[DotaObject]) -> None:
    """Write ``x1 y1 x2 y2 x3 y3 x4 y4 class difficulty`` lines (no header, as mmrotate reads)."""
    lines = []
    for obj in objects:
        coords = " ".join(_fmt(v) for v in np.asarray(obj.poly, float).reshape(-1))
        lines.append(f"{coords} {obj.name} {obj.difficulty}\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(lines))


def window_starts(length: int, patch_size: int, step: int) -> list[int]:
    """Window offsets along one axis: 0, step, 2*step, ... and a last one ending at the edge."""
    if step <= 0:
        raise ValueError(f"gap must be smaller than patch_size (step = {step})")
    if length <= patch_size:
        return [0]
    return [*range(0, length - patch_size, step), length - patch_size]


def sliding_windows(width: int, height: int, patch_size: int, gap: int) -> list[tuple[int, int]]:
    """Top-left corners (x, y) of all windows, x-major as in the DOTA devkit."""
    step = patch_size - gap
    ys = window_starts(height, patch_size, step)
    return [(x, y) for x in window_starts(width, patch_size, step) for y in ys]


def signed_area(poly: np.ndarray) -> float:
    """Shoelace area; positive when the corners run clockwise on screen (y pointing down)."""
    x, y = np.asarray(poly, float).T
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def polygon_area(poly: np.ndarray) -> float:
    return abs(signed_area(poly))


def _clip_axis(points: list, axis: int, bound: float, keep_above: bool) -> list:
    """One Sutherland-Hodgman pass against the line ``p[axis] = bound``."""
    out = []
    for i, cur in enumerate(points):
        prev = points[i - 1]
        cur_in = cur[axis] >= bound if keep_above else cur[axis] <= bound
        prev_in = prev[axis] >= bound if keep_above else prev[axis] <= bound
        if cur_in != prev_in:
            t = (bound - prev[axis]) / (cur[axis] - prev[axis])
            cross = [prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])]
            cross[axis] = bound
            out.append(tuple(cross))
        if cur_in:
            out.append(cur)
    return out


def clip_polygon(
    poly: np.ndarray, box: Sequence[float], use_shapely: bool | None = None
) -> np.ndarray:
    """Part of ``poly`` inside the box (x0, y0, x1, y1), as a (k, 2) array (k = 0 if none).

    Shapely when importable; otherwise Sutherland-Hodgman, exact for convex polygons such
    as rotated rectangles. A non-convex remainder from shapely is replaced by its hull.
    """
    x0, y0, x1, y1 = box
    if use_shapely is None:
        use_shapely = _ShapelyPolygon is not None
    if use_shapely:
        shape = _ShapelyPolygon(np.asarray(poly, float))
        if not shape.is_valid:  # self-intersecting annotation
            shape = shape.buffer(0)
        part = shape.intersection(_shapely_box(x0, y0, x1, y1))
        if part.is_empty or part.area <= 0:
            return np.zeros((0, 2))
        if part.geom_type != "Polygon":
            part = part.convex_hull
        return np.asarray(part.exterior.coords[:-1], float)
    points = [tuple(p) for p in np.asarray(poly, float)]
    for axis, bound, keep_above in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        points = _clip_axis(points, axis, bound, keep_above)
        if not points:
            return np.zeros((0, 2))
    return np.asarray(points, float)


def _drop_degenerate(poly: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Remove repeated corners and corners on a straight edge."""
    changed = True
    while changed and len(poly) >= 3:
        changed = False
        for i in range(len(poly)):
            prev, cur, nxt = poly[i - 1], poly[i], poly[(i + 1) % len(poly)]
            if abs(signed_area(np.stack([prev, cur, nxt]))) <= eps:
                poly = np.delete(poly, i, axis=0)
                changed = True
                break
    return poly


def to_quadrilateral(poly: np.ndarray) -> np.ndarray | None:
    """Four corners for a convex polygon, clockwise on screen, inside the original polygon
    (a triangle gets the midpoint of its longest edge); None if the polygon is degenerate."""
    poly = _drop_degenerate(np.asarray(poly, float))
    if len(poly) < 3:
        return None
    if signed_area(poly) < 0:
        poly = poly[::-1]
    while len(poly) > 4:
        losses = [
            polygon_area(np.stack([poly[i - 1], poly[i], poly[(i + 1) % len(poly)]]))
            for i in range(len(poly))
        ]
        poly = np.delete(poly, int(np.argmin(losses)), axis=0)
    if len(poly) == 3:
        edges = [np.linalg.norm(poly[(i + 1) % 3] - poly[i]) for i in range(3)]
        i = int(np.argmax(edges))
        poly = np.insert(poly, i + 1, (poly[i] + poly[(i + 1) % 3]) / 2, axis=0)
    return poly


def objects_in_window(
    objects: Sequence[DotaObject],
    window: Sequence[float],
    iof_thr: float = 0.7,
    partial_difficulty: int | None = None,
    use_shapely: bool | None = None,
) -> list[DotaObject]:
    """The objects of one window (x0, y0, x1, y1), clipped and shifted to patch coordinates."""
    if not objects:
        return []
    x0, y0, x1, y1 = window
    polys = np.stack([np.asarray(o.poly, float) for o in objects])  # (n, 4, 2)
    lo, hi = polys.min(1), polys.max(1)
    x, y = polys[..., 0], polys[..., 1]
    areas = 0.5 * np.abs((x * np.roll(y, -1, 1) - np.roll(x, -1, 1) * y).sum(1))
    touches = (lo[:, 0] < x1) & (hi[:, 0] > x0) & (lo[:, 1] < y1) & (hi[:, 1] > y0) & (areas > 0)
    inside = (lo[:, 0] >= x0) & (hi[:, 0] <= x1) & (lo[:, 1] >= y0) & (hi[:, 1] <= y1)
    kept = []
    for i in np.flatnonzero(touches):  # objects whose box misses the window are skipped
        obj = objects[i]
        if inside[i]:  # wholly inside: the original corners, in their order
            poly, difficulty = polys[i], obj.difficulty
        else:
            clipped = clip_polygon(polys[i], window, use_shapely)
            iof = polygon_area(clipped) / areas[i] if len(clipped) >= 3 else 0.0
            if iof >= iof_thr:
                difficulty = obj.difficulty
            elif partial_difficulty is not None and iof > 0:
                difficulty = partial_difficulty
            else:
                continue
            poly = to_quadrilateral(clipped)
            if poly is None:
                continue
        kept.append(DotaObject(poly - np.array([x0, y0]), obj.name, difficulty))
    return kept


def patch_name(stem: str, rate: float, x: int, y: int) -> str:
    """DOTA devkit patch name ``{stem}__{rate}__{x}___{y}``, rate as a float (``1.0``)."""
    return f"{stem}__{float(rate)}__{x}___{y}"


def split_image(
    img_path: str | Path,
    ann_path: str | Path | None,
    dst_root: str | Path,
    patch_size: int = 1024,
    gap: int = 200,
    rate: float = 1.0,
    iof_thr: float = 0.7,
    partial_difficulty: int | None = None,
    padding: bool = True,
    save_ext: str = ".png",
) -> tuple[str, int]:
    """Write every patch of one image under dst_root/images, and its annfile under
    dst_root/annfiles unless ``ann_path`` is None (a missing file means no objects).

    Returns (image name, number of patches).
    """
    img_path, dst_root = Path(img_path), Path(dst_root)
    img = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot read image {img_path}")
    objects = None  # no annotations wanted (a test set)
    if ann_path is not None:
        objects = read_dota_ann(ann_path) if Path(ann_path).exists() else []
    if rate != 1:
        img = cv2.resize(img, None, fx=rate, fy=rate, interpolation=cv2.INTER_CUBIC)
        for obj in objects or []:
            obj.poly = obj.poly * rate
    height, width = img.shape[:2]
    windows = sliding_windows(width, height, patch_size, gap)
    (dst_root / "images").mkdir(parents=True, exist_ok=True)
    for x, y in windows:
        patch = img[y : y + patch_size, x : x + patch_size]
        if padding and patch.shape[:2] != (patch_size, patch_size):
            padded = np.zeros((patch_size, patch_size, img.shape[2]), img.dtype)
            padded[: patch.shape[0], : patch.shape[1]] = patch
            patch = padded
        name = patch_name(img_path.stem, rate, x, y)
        if not cv2.imwrite(str(dst_root / "images" / f"{name}{save_ext}"), patch):
            raise OSError(f"cannot write patch {name}{save_ext}")
        if objects is not None:
            # clip to the image part of the window: padding holds no objects
            window = (x, y, min(x + patch_size, width), min(y + patch_size, height))
            kept = objects_in_window(objects, window, iof_thr, partial_difficulty)
            write_dota_ann(dst_root / "annfiles" / f"{name}.txt", kept)
    return img_path.name, len(windows)


def find_ann_dir(src_root: Path) -> Path | None:
    """``annfiles/`` (mmrotate) or ``labelTxt/`` (DOTA release) under src_root, if any."""
    for name in ANN_DIRS:
        if (src_root / name).is_dir():
            return src_root / name
    return None


def _split_task(task: tuple, **kwargs) -> tuple[str, int]:
    img_path, ann_path, rate = task
    return split_image(img_path, ann_path, rate=rate, **kwargs)


def split_dota(
    src_root: str | Path,
    dst_root: str | Path,
    patch_size: int = 1024,
    gap: int = 200,
    rates: Sequence[float] = (1.0,),
    iof_thr: float = 0.7,
    img_exts: Sequence[str] = IMG_EXTS,
    nproc: int = 1,
    partial_difficulty: int | None = None,
    padding: bool = True,
    save_ext: str = ".png",
    progress: Callable[[int, int, str, int], None] | None = None,
) -> dict[str, int]:
    """Split src_root/images (+ annfiles/ or labelTxt/, optional: test sets have none) into
    dst_root/images and dst_root/annfiles. An image without its txt gets empty annfiles.

    ``progress(done, total, image_name, num_patches)`` is called after each image and rate.
    Returns counts: images, patches.
    """
    src_root, dst_root = Path(src_root), Path(dst_root)
    if not 0 <= gap < patch_size:
        raise ValueError(f"need 0 <= gap < patch_size, got gap={gap}, patch_size={patch_size}")
    if not 0 < iof_thr <= 1:
        raise ValueError(f"iof_thr must be in (0, 1], got {iof_thr}")
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in img_exts}
    images = sorted(p for p in (src_root / "images").iterdir() if p.suffix.lower() in exts)
    if not images:
        raise FileNotFoundError(
            f"no images with extensions {sorted(exts)} in {src_root / 'images'}"
        )
    ann_dir = find_ann_dir(src_root)
    tasks = [
        (img, None if ann_dir is None else ann_dir / f"{img.stem}.txt", float(rate))
        for img in images
        for rate in rates
    ]
    work = partial(
        _split_task,
        dst_root=dst_root,
        patch_size=patch_size,
        gap=gap,
        iof_thr=iof_thr,
        partial_difficulty=partial_difficulty,
        padding=padding,
        save_ext=save_ext,
    )
    patches = 0
    if nproc > 1:
        with Pool(nproc) as pool:
            results = pool.imap_unordered(work, tasks)
            for done, (name, count) in enumerate(results, 1):
                patches += count
                if progress:
                    progress(done, len(tasks), name, count)
    else:
        for done, task in enumerate(tasks, 1):
            name, count = work(task)
            patches += count
            if progress:
                progress(done, len(tasks), name, count)
    return {"images": len(images), "patches": patches}


def print_progress(done: int, total: int, name: str, count: int) -> None:
    """A progress line: rewritten in place on a terminal, every 5% in a log file."""
    if sys.stderr.isatty():
        end = "\n" if done == total else ""
        print(f"\r[{done}/{total}] {name}: {count} patches", end=end, file=sys.stderr, flush=True)
    elif done == total or done % max(1, total // 20) == 0:
        print(f"[{done}/{total}] {name}: {count} patches", file=sys.stderr, flush=True)
