"""Generated datasets, DOTA patch splitting and the dataset / schedule / runtime base configs.

Generators are checked against their own pixels (a shape's mask covers pixels of its
class colour), the splitter against rasterised overlaps and the source image, and the base
configs by building the stock OpenMMLab datasets on generated data.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from tools.data import dota_patches as ds
from tools.data import synthetic_shapes as ss

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "_base_"
# mmrotate's DOTADataset.METAINFO classes (DOTA-v1.0)
DOTA_V1_CLASSES = (
    "plane",
    "baseball-diamond",
    "bridge",
    "ground-track-field",
    "small-vehicle",
    "large-vehicle",
    "ship",
    "tennis-court",
    "basketball-court",
    "storage-tank",
    "soccer-ball-field",
    "roundabout",
    "harbor",
    "swimming-pool",
    "helicopter",
)


def raster(poly: np.ndarray, width: int, height: int) -> np.ndarray:
    """Reference mask of a polygon at 1/16 px corners (only OpenCV's scan conversion, none
    of the geometry under test)."""
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.round(np.asarray(poly) * 16).astype(np.int32)], 1, shift=4)
    return mask


def raster_iof(poly: np.ndarray, window: tuple[int, int, int, int], scale: int = 8) -> float:
    """Share of a polygon inside an axis-aligned window, by counting pixels of an 8x finer
    raster of the polygon's neighbourhood (scan conversion adds ~1/8 px at the border)."""
    origin = np.floor(poly.min(0)) - 2
    width, height = (np.ceil(poly.max(0) - origin).astype(int) + 2) * scale
    mask = raster((poly - origin) * scale, width, height)
    x0, y0 = np.clip((np.asarray(window[:2]) - origin) * scale, 0, None).astype(int)
    x1, y1 = np.clip((np.asarray(window[2:]) - origin) * scale, 0, None).astype(int)
    return float(mask[y0:y1, x0:x1].sum() / mask.sum())


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- generators


def test_coco_annotations_match_the_pixels(tmp_path):
    ss.make_shapes_coco(tmp_path, num_train=8, num_val=2, img_size=(128, 96), seed=3)
    coco = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(ss.SHAPES_CLASSES)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert len(coco["images"]) == 8 and len({a["id"] for a in coco["annotations"]}) == len(
        coco["annotations"]
    )
    per_image = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann)
    for info in coco["images"]:
        img = cv2.imread(str(tmp_path / "train" / info["file_name"]))
        assert img.shape == (96, 128, 3) == (info["height"], info["width"], 3)
        anns = per_image[info["id"]]
        assert 1 <= len(anns) <= 4
        occupied = np.zeros(img.shape[:2], np.uint8)
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert ann["iscrowd"] == 0 and 0 <= x and 0 <= y and x + w <= 128 and y + h <= 96
            assert 10 <= max(w, h) <= 72  # 16-60 px shapes, turned by up to 20 degrees
            (seg,) = ann["segmentation"]
            poly = np.asarray(seg).reshape(-1, 2)
            assert len(seg) % 2 == 0 and len(poly) >= 3 and ds.polygon_area(poly) > 0
            np.testing.assert_allclose(
                [*poly.min(0), *(poly.max(0) - poly.min(0))], ann["bbox"], atol=0.02
            )
            mask = raster(poly, 128, 96)
            assert (
                ann["area"] == pytest.approx(ds.polygon_area(poly), abs=0.01) and ann["area"] > 100
            )
            # scan conversion covers the polygon plus up to a pixel along its outline
            perimeter = np.linalg.norm(np.roll(poly, -1, 0) - poly, axis=1).sum()
            assert 0 <= mask.sum() - ann["area"] <= perimeter + 4
            assert not (occupied & mask).any(), "shapes overlap"
            occupied |= mask
            # the annotated pixels are the shape: its class colour (+-25 jitter), not background
            inner = cv2.erode(mask, np.ones((3, 3), np.uint8)) > 0
            colour = img[inner].mean(0)
            expected = np.array(ss.SHAPES_COLOURS[names[ann["category_id"]]])
            assert np.abs(colour - expected).max() <= 30, (colour, expected)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("maker", [ss.make_shapes_coco, ss.make_shapes_ade, ss.make_shapes_dota])
def test_generators_are_deterministic(tmp_path, maker):
    maker(tmp_path / "a", 3, 1, img_size=(64, 64), seed=7)
    maker(tmp_path / "b", 3, 1, img_size=(64, 64), seed=7)
    maker(tmp_path / "c", 3, 1, img_size=(64, 64), seed=8)
    maker(tmp_path / "d", 2, 1, img_size=(64, 64), seed=7)
    a, b, c, d = (_tree(tmp_path / k) for k in "abcd")
    assert a == b
    images = [k for k in a if k.endswith((".png", ".jpg"))]
    assert all(a[k] != c[k] for k in images)
    # image i does not depend on how many images are generated
    assert all(d[k] == a[k] for k in d if k.endswith((".png", ".jpg", ".txt")))


def test_ade_labels_and_reduce_zero_label_mapping(tmp_path):
    ss.make_shapes_ade(tmp_path, num_train=6, num_val=2, img_size=(96, 80), seed=1)
    for folder, num in (("training", 6), ("validation", 2)):
        images = sorted((tmp_path / "images" / folder).glob("*.jpg"))
        labels = sorted((tmp_path / "annotations" / folder).glob("*.png"))
        assert [p.stem for p in images] == [p.stem for p in labels] and len(images) == num
    seen = set()
    for img_path in sorted((tmp_path / "images" / "training").glob("*.jpg")):
        img = cv2.imread(str(img_path))
        label = cv2.imread(str(tmp_path / "annotations" / "training" / f"{img_path.stem}.png"), -1)
        assert label.shape == (80, 96) and label.dtype == np.uint8
        values = set(np.unique(label).tolist())
        assert values <= {0, 1, 2, 3, 4} and {0, 1} <= values  # void border + background
        seen |= values
        # void pixels line the shapes' outlines (thicker only at sharp corners)
        void = label == ss.ADE_VOID
        grown = cv2.dilate((label >= 2).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        assert grown[void].all() and void.mean() < 0.15
        # shape pixels carry the class colour
        for value in values - {0, 1}:
            name = ss.SHAPES_ADE_CLASSES[value - 1]  # reduce_zero_label: value -> value - 1
            colour = img[label == value].mean(0)
            assert np.abs(colour - ss.SHAPES_COLOURS[name]).max() <= 35
    assert seen == {0, 1, 2, 3, 4}


def _is_rectangle(poly: np.ndarray) -> bool:
    sides = np.linalg.norm(np.roll(poly, -1, 0) - poly, axis=1)
    diagonals = np.linalg.norm(poly[2:] - poly[:2], axis=1)
    return np.allclose(sides[:2], sides[2:], atol=0.02) and np.isclose(*diagonals, atol=0.02)


def test_dota_files_are_rotated_rectangles_of_dota_classes(tmp_path):
    out = ss.make_shapes_dota(tmp_path, num_train=6, num_val=2, img_size=(160, 128), seed=2)
    assert set(ss.SHAPES_DOTA_CLASSES) <= set(DOTA_V1_CLASSES)
    for split, num in (("train", 6), ("val", 2)):
        anns = sorted((out[split] / "annfiles").glob("*.txt"))
        assert [p.stem for p in anns] == [
            p.stem for p in sorted((out[split] / "images").glob("*.png"))
        ]
        assert len(anns) == num
    angles = []
    for ann in sorted((out["train"] / "annfiles").glob("*.txt")):
        lines = ann.read_text().splitlines()
        assert 1 <= len(lines) <= 4 and all(len(line.split()) == 10 for line in lines)
        img = cv2.imread(str(out["train"] / "images" / f"{ann.stem}.png"))
        for obj in ds.read_dota_ann(ann):
            assert obj.name in ss.SHAPES_DOTA_CLASSES and obj.difficulty == 0
            assert _is_rectangle(obj.poly)
            assert (
                (obj.poly >= 0).all()
                and (obj.poly[:, 0] <= 160).all()
                and (obj.poly[:, 1] <= 128).all()
            )
            assert ds.signed_area(obj.poly) > 0  # clockwise on screen, as DOTA
            long, short = sorted(np.linalg.norm(obj.poly[[1, 2]] - obj.poly[[0, 1]], axis=1))[::-1]
            (lo, hi), colour = ss.DOTA_STYLE[obj.name]
            assert 16 - 0.05 <= long <= 60 + 0.05 and lo - 0.01 <= long / short <= hi + 0.01
            inner = cv2.erode(raster(obj.poly, 160, 128), np.ones((3, 3), np.uint8)) > 0
            assert np.abs(img[inner].mean(0) - colour).max() <= 30
            edge = obj.poly[1] - obj.poly[0]
            angles.append(math.atan2(edge[1], edge[0]))
    assert np.ptp(np.mod(angles, np.pi)) > 1.0  # genuinely rotated, not axis-aligned


def test_generate_shapes_cli(tmp_path):
    tool = load_tool("generate_shapes")
    tool.main(
        [
            "--task",
            "dota",
            "--out",
            str(tmp_path),
            "--num-train",
            "2",
            "--num-val",
            "1",
            "--size",
            "64",
            "48",
            "--seed",
            "4",
        ]
    )
    assert len(list((tmp_path / "train" / "images").glob("*.png"))) == 2
    assert cv2.imread(str(tmp_path / "val" / "images" / "S0000.png")).shape == (48, 64, 3)


# --------------------------------------------------------------------------- DOTA splitting


@pytest.mark.parametrize(
    "length,size,step",
    [
        (2500, 1024, 824),
        (1800, 1024, 824),
        (1024, 1024, 824),
        (1000, 1024, 824),
        (1848, 1024, 824),
        (1849, 1024, 824),
        (300, 100, 80),
        (4000, 1024, 524),
    ],
)
def test_window_starts(length, size, step):
    starts = ds.window_starts(length, size, step)
    expected = 1 if length <= size else math.ceil((length - size) / step) + 1  # devkit count
    assert len(starts) == expected and starts[0] == 0
    if length > size:
        assert starts[-1] + size == length  # last window aligned to the edge
        assert all(b - a == step for a, b in zip(starts[:-2], starts[1:-1]))
        assert 0 < starts[-1] - starts[-2] <= step  # overlap at least the gap, full coverage
    assert ds.window_starts(2500, 1024, 824) == [0, 824, 1476]


def random_rectangle(rng, extent: float) -> np.ndarray:
    return ss.rotated_rectangle(
        *rng.uniform(0, extent, 2), *rng.uniform(5, extent / 2, 2), rng.uniform(0, np.pi)
    )


def inside_convex(points: np.ndarray, poly: np.ndarray, tol: float = 1e-6) -> bool:
    """Every point on the inner side of every edge of a clockwise-on-screen convex polygon."""
    edges = np.roll(poly, -1, 0) - poly
    rel = points[:, None, :] - poly[None]
    cross = edges[None, :, 0] * rel[..., 1] - edges[None, :, 1] * rel[..., 0]
    return bool((cross >= -tol * np.linalg.norm(edges, axis=1)).all())


def test_clip_shapely_and_sutherland_hodgman_agree():
    pytest.importorskip("shapely")
    rng = np.random.default_rng(0)
    for _ in range(100):
        poly = random_rectangle(rng, 100)
        x0, y0 = rng.uniform(0, 60, 2)
        box = (x0, y0, x0 + rng.uniform(5, 60), y0 + rng.uniform(5, 60))
        a = ds.clip_polygon(poly, box, use_shapely=True)
        b = ds.clip_polygon(poly, box, use_shapely=False)
        assert abs(ds.polygon_area(a) if len(a) else 0.0) == pytest.approx(
            ds.polygon_area(b) if len(b) else 0.0, abs=1e-6
        )
        if len(b):
            assert (b[:, 0] >= box[0] - 1e-9).all() and (b[:, 0] <= box[2] + 1e-9).all()
            assert (b[:, 1] >= box[1] - 1e-9).all() and (b[:, 1] <= box[3] + 1e-9).all()
            quad = ds.to_quadrilateral(b)
            hull = b if ds.signed_area(b) > 0 else b[::-1]
            if quad is not None:
                assert quad.shape == (4, 2) and ds.signed_area(quad) > 0
                assert inside_convex(quad, hull, tol=1e-6)  # inside the clipped part
    square = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float)
    np.testing.assert_allclose(ds.to_quadrilateral(square), square)


BIG_W, BIG_H, PATCH, GAP = 2500, 1800, 1024, 200
# windows: x in {0, 824, 1476}, y in {0, 776}
BIG_OBJECTS = [
    ("a_overlap", ss.rotated_rectangle(930, 120, 60, 40, 0.0)),  # in x-windows 0 and 824
    ("b_mostly_out", ss.rotated_rectangle(1050, 300, 100, 40, 0.0)),  # 24% in window 0 -> dropped
    ("c_80pct", ss.rotated_rectangle(1015, 520, 30, 40, 0.0)),  # 80% in window 0 -> clipped
    ("d_rot_edge", ss.rotated_rectangle(300, 1005, 90, 40, 0.5)),  # turned, on y = 1024
    ("e_corner", ss.rotated_rectangle(1010, 1010, 60, 60, 0.3)),  # on a window corner
    ("f_far", ss.rotated_rectangle(2300, 1600, 120, 50, 1.2)),  # bottom-right window only
]


@pytest.fixture(scope="module")
def big_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("dota_big")
    rng = np.random.default_rng(0)
    img = np.zeros((BIG_H, BIG_W, 3), np.uint8)
    img[...] = rng.integers(0, 255, (1, BIG_W, 3), np.uint8)  # each column its own colour
    img[:, :, 0] = (np.arange(BIG_H) % 251)[:, None]  # and each row
    (root / "src" / "images").mkdir(parents=True)
    cv2.imwrite(str(root / "src" / "images" / "P0001.png"), img)
    # a DOTA release file: header lines, then objects; class names are checked verbatim
    text = "imagesource:GoogleEarth\ngsd:0.146\n" + "".join(
        " ".join(f"{v:.3f}" for v in poly.reshape(-1)) + f" {name} 1\n"
        for name, poly in BIG_OBJECTS
    )
    (root / "src" / "labelTxt").mkdir()
    (root / "src" / "labelTxt" / "P0001.txt").write_text(text)
    counts = ds.split_dota(root / "src", root / "dst", patch_size=PATCH, gap=GAP, nproc=1)
    return root, img, counts


def test_split_windows_names_and_pixels(big_split):
    root, img, counts = big_split
    names = sorted(p.stem for p in (root / "dst" / "images").glob("*.png"))
    expected = sorted(f"P0001__1.0__{x}___{y}" for x in (0, 824, 1476) for y in (0, 776))
    assert names == expected and counts == {"images": 1, "patches": 6}
    assert sorted(p.stem for p in (root / "dst" / "annfiles").glob("*.txt")) == expected
    for name in names:
        x, y = map(int, re.fullmatch(r"P0001__1\.0__(\d+)___(\d+)", name).groups())
        patch = cv2.imread(str(root / "dst" / "images" / f"{name}.png"))
        np.testing.assert_array_equal(patch, img[y : y + PATCH, x : x + PATCH])


def test_split_objects_follow_rasterised_iof(big_split):
    root, _, _ = big_split
    kept_by_window = {}
    for ann in (root / "dst" / "annfiles").glob("*.txt"):
        x, y = map(int, re.search(r"__(\d+)___(\d+)$", ann.stem).groups())
        objs = ds.read_dota_ann(ann)
        kept_by_window[(x, y)] = {o.name: o for o in objs}
        for obj in objs:
            assert obj.poly.shape == (4, 2) and ds.polygon_area(obj.poly) > 0
            assert (obj.poly >= -1e-6).all() and (obj.poly <= PATCH + 1e-6).all()  # inside patch
            original = dict(BIG_OBJECTS)[obj.name]
            # the kept polygon is part of the original object, moved by the window offset
            assert inside_convex(obj.poly + [x, y], original, tol=0.02)
    seen_clipped = 0
    for (x, y), kept in kept_by_window.items():
        for name, poly in BIG_OBJECTS:
            iof = raster_iof(poly, (x, y, x + PATCH, y + PATCH))
            assert abs(iof - 0.7) > 0.03, f"test object {name} too close to the threshold"
            assert (name in kept) == (iof >= 0.7), (name, x, y, iof)
            if name in kept:
                obj = kept[name]
                assert obj.difficulty == 1  # own difficulty kept
                area = ds.polygon_area(obj.poly) / ds.polygon_area(dict(BIG_OBJECTS)[name])
                assert area <= iof + 0.03 and area >= 0.7 * iof  # clipped, not grown
                if iof < 0.999:
                    seen_clipped += 1
                else:  # wholly inside: the original corners, only shifted
                    np.testing.assert_allclose(
                        obj.poly + [x, y], dict(BIG_OBJECTS)[name], atol=0.006
                    )
    assert seen_clipped >= 3
    # the specific cases
    assert set(kept_by_window[(0, 0)]) >= {"a_overlap", "c_80pct"}
    assert (
        "b_mostly_out" not in kept_by_window[(0, 0)] and "b_mostly_out" in kept_by_window[(824, 0)]
    )
    np.testing.assert_allclose(
        kept_by_window[(824, 0)]["a_overlap"].poly.min(0), [900 - 824, 100], atol=0.01
    )
    np.testing.assert_allclose(kept_by_window[(0, 0)]["c_80pct"].poly[:, 0].max(), 1024, atol=0.01)
    assert list(kept_by_window[(1476, 776)]) == ["f_far"]


def test_split_partial_objects_difficulty_two(big_split, tmp_path):
    root, _, _ = big_split
    ds.split_dota(root / "src", tmp_path, patch_size=PATCH, gap=GAP, partial_difficulty=2)
    objs = {o.name: o for o in ds.read_dota_ann(tmp_path / "annfiles" / "P0001__1.0__0___0.txt")}
    assert objs["b_mostly_out"].difficulty == 2 and objs["c_80pct"].difficulty == 1
    assert objs["b_mostly_out"].poly[:, 0].min() == pytest.approx(1000 - 0, abs=0.01)
    assert objs["b_mostly_out"].poly[:, 0].max() == pytest.approx(1024, abs=0.01)


def test_split_rates_padding_test_set_and_cli(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    img = np.random.default_rng(1).integers(0, 255, (200, 300, 3), np.uint8)
    cv2.imwrite(str(src / "images" / "x.png"), img)
    cv2.imwrite(str(src / "images" / "y.jpg"), img)
    ds.write_dota_ann(
        src / "annfiles" / "x.txt",
        [ds.DotaObject(ss.rotated_rectangle(100, 60, 40, 20, 0.0), "ship", 0)],
    )
    # y has no annfile: it gets empty annfiles
    tool = load_tool("dota_split")
    tool.main(
        [
            "--src",
            str(src),
            "--dst",
            str(tmp_path / "dst"),
            "--patch-size",
            "256",
            "--gap",
            "56",
            "--rates",
            "0.5",
            "2.0",
            "--nproc",
            "2",
        ]
    )
    names = {p.stem for p in (tmp_path / "dst" / "images").glob("*.png")}
    # 0.5: 150x100 -> one padded window; 2.0: 600x400 -> x {0, 200, 344} x y {0, 144}
    big = {f"x__2.0__{x}___{y}" for x in (0, 200, 344) for y in (0, 144)}
    assert {n for n in names if n.startswith("x")} == {"x__0.5__0___0"} | big
    assert len(names) == 14
    small = cv2.imread(str(tmp_path / "dst" / "images" / "x__0.5__0___0.png"))
    assert small.shape == (256, 256, 3) and not small[100:].any() and not small[:, 150:].any()
    (obj,) = ds.read_dota_ann(tmp_path / "dst" / "annfiles" / "x__0.5__0___0.txt")
    np.testing.assert_allclose(obj.poly, ss.rotated_rectangle(50, 30, 20, 10, 0.0), atol=0.01)
    (obj,) = ds.read_dota_ann(tmp_path / "dst" / "annfiles" / "x__2.0__0___0.txt")
    np.testing.assert_allclose(obj.poly, ss.rotated_rectangle(200, 120, 80, 40, 0.0), atol=0.01)
    assert (tmp_path / "dst" / "annfiles" / "y__0.5__0___0.txt").read_text() == ""
    # a test set (images only) gets no annfiles
    (src / "annfiles").rename(tmp_path / "annfiles")  # now a test set: images only
    ds.split_dota(src, tmp_path / "test", patch_size=128, gap=28, img_exts=("png",))
    assert not (tmp_path / "test" / "annfiles").exists()
    names = sorted(p.name for p in (tmp_path / "test" / "images").iterdir())
    assert names == [f"x__1.0__{x}___{y}.png" for x in (0, 100, 172) for y in (0, 72)]


# --------------------------------------------------------------------------- base configs

SHAPES_CASES = [
    ("shapes_coco_instance.py", "mmdet", ss.make_shapes_coco),
    ("shapes_ade.py", "mmseg", ss.make_shapes_ade),
    ("shapes_dota.py", "mmrotate", ss.make_shapes_dota),
]
REAL_CASES = [
    ("coco_instance.py", "mmdet", "CocoDataset"),
    ("ade20k_512.py", "mmseg", "ADE20KDataset"),
    ("dota_le90.py", "mmrotate", "DOTADataset"),
]


def toolbox(scope: str):
    """The toolbox's registry module with all its modules registered (skip if missing)."""
    pytest.importorskip("mmcv.ops")
    pytest.importorskip(scope)
    importlib.import_module(f"{scope}.utils").register_all_modules(init_default_scope=False)
    return importlib.import_module(f"{scope}.registry")


def build_in_scope(scope: str, registry, cfg):
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(cfg)


@pytest.mark.parametrize("config,scope,maker", SHAPES_CASES, ids=[c[0] for c in SHAPES_CASES])
def test_shapes_config_builds_dataset_and_pipeline(tmp_path, config, scope, maker):
    registry = toolbox(scope)
    from mmengine.config import Config

    cfg = Config.fromfile(str(BASE / "datasets" / config))
    maker(tmp_path, num_train=4, num_val=2, seed=0)
    classes = cfg.train_dataloader.dataset.metainfo["classes"]
    for loader in ("train_dataloader", "val_dataloader"):
        dataset_cfg = cfg[loader].dataset
        dataset_cfg.data_root = str(tmp_path)
        dataset = build_in_scope(scope, registry.DATASETS, dataset_cfg)
        assert len(dataset) == (4 if loader == "train_dataloader" else 2)
        assert tuple(dataset.metainfo["classes"]) == tuple(classes)
        sample = dataset[0]
        assert set(sample) == {"inputs", "data_samples"}
        inputs, data = sample["inputs"], sample["data_samples"]
        assert inputs.ndim == 3 and inputs.shape[0] == 3
        if scope == "mmseg":
            assert max(inputs.shape[1:]) <= 128  # random resize, then crops of at most 128
            labels = set(data.gt_sem_seg.data.unique().tolist())
            assert labels <= {0, 1, 2, 3, 255} and 255 in labels and 0 in labels
            continue
        gt = data.gt_instances
        assert len(gt) >= 1 and gt.labels.min() >= 0 and gt.labels.max() < len(classes)
        if scope == "mmdet":
            assert gt.bboxes.shape[-1] == 4 and len(gt.masks) == len(gt)
            assert tuple(inputs.shape[1:]) == (128, 128)
        else:
            assert type(gt.bboxes).__name__ == "RotatedBoxes" and gt.bboxes.tensor.shape[-1] == 5
            w, h = gt.bboxes.tensor[:, 2:4].T
            assert (w > 0).all() and (h > 0).all()


@pytest.mark.parametrize("config,scope,dataset_type", REAL_CASES, ids=[c[0] for c in REAL_CASES])
def test_real_dataset_configs_resolve(config, scope, dataset_type):
    registry = toolbox(scope)
    from mmengine.config import Config

    cfg = Config.fromfile(str(BASE / "datasets" / config))
    expected = {"mmdet": (4, 32), "mmseg": (2, 16), "mmrotate": (2, 16)}[scope]
    assert (cfg.train_dataloader.batch_size, cfg.auto_scale_lr.base_batch_size) == expected
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope(scope):
        for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
            dataset = cfg[loader].dataset
            assert dataset.type == dataset_type and registry.DATASETS.get(dataset.type) is not None
            for step in dataset.pipeline:
                assert registry.TRANSFORMS.get(step["type"]) is not None, step["type"]
                # arguments are accepted too: build each transform
                registry.TRANSFORMS.build(step)
        for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
            assert registry.METRICS.get(evaluator["type"]) is not None


def test_bases_compose_and_schedules_build(tmp_path):
    """Each dataset + schedule + runtime triple merges (no key defined twice) and its
    schedulers and runtime pieces build."""
    pytest.importorskip("mmengine")
    import torch
    from mmengine.config import Config
    from mmengine.registry import PARAM_SCHEDULERS

    triples = [
        ("coco_instance.py", "coco_1x_adamw.py", "default_runtime_det.py", "mmdet"),
        ("ade20k_512.py", "ade20k_160k_adamw.py", "default_runtime_seg.py", "mmseg"),
        ("dota_le90.py", "dota_1x_sgd.py", "default_runtime_rotated.py", "mmrotate"),
    ]
    for dataset, schedule, runtime, scope in triples:
        path = tmp_path / f"{scope}.py"
        path.write_text(
            f"_base_ = [{str(BASE / 'datasets' / dataset)!r}, "
            f"{str(BASE / 'schedules' / schedule)!r}, {str(BASE / runtime)!r}]\n"
        )
        cfg = Config.fromfile(str(path))
        assert cfg.default_scope == scope
        assert cfg.custom_imports == dict(
            imports=["mm_spectral.openmmlab"], allow_failed_imports=False
        )
        assert (
            cfg.default_hooks.logger.interval == 50
            and cfg.default_hooks.checkpoint.type == "CheckpointHook"
        )
        assert cfg.vis_backends == [dict(type="LocalVisBackend")]
        assert cfg.optim_wrapper.constructor == "AdapterOptimWrapperConstructor"
        assert cfg.optim_wrapper.type == "OptimWrapper"
        optimizer = torch.optim.SGD(
            [torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim_wrapper.optimizer.lr
        )
        for step in cfg.param_scheduler:
            PARAM_SCHEDULERS.build(dict(step, optimizer=optimizer))
    coco, ade, dota = (
        Config.fromfile(str(BASE / "schedules" / s))
        for s in ("coco_1x_adamw.py", "ade20k_160k_adamw.py", "dota_1x_sgd.py")
    )
    assert coco.optim_wrapper.optimizer == dict(  # AdamW arithmetic, one launch per buffer
        type="FlatAdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05
    )
    assert ade.optim_wrapper.optimizer == coco.optim_wrapper.optimizer
    assert coco.train_cfg.max_epochs == 12 and coco.param_scheduler[1].milestones == [8, 11]
    assert coco.param_scheduler[0].end == 500
    assert ade.train_cfg == dict(type="IterBasedTrainLoop", max_iters=160000, val_interval=16000)
    assert ade.param_scheduler[0].end == 1500 and ade.param_scheduler[1].power == 1.0
    assert dota.optim_wrapper.optimizer == dict(
        type="SGD", lr=5e-3, momentum=0.9, weight_decay=1e-4
    )
    assert dota.optim_wrapper.clip_grad.max_norm == 35 and dota.param_scheduler[1].milestones == [
        8,
        11,
    ]
