"""A tiny synthetic COCO instance-segmentation set, so the whole detection path runs in CI without COCO.

Each image is noise with a few filled polygons; every polygon is one annotation with its bounding box, area and
polygon mask, in the COCO layout that ``--coco-root`` expects.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: Two COCO category names (with their COCO ids), so mmdet's class handling is exercised as on real COCO.
CATEGORIES = ({"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"})
CLASSES = tuple(c["name"] for c in CATEGORIES)


def _polygon(rng: np.random.Generator, width: int, height: int) -> list[float]:
    """A convex quadrilateral at least 32 px across, inside the image."""
    w, h = rng.integers(32, width // 2 + 1), rng.integers(32, height // 2 + 1)
    x0, y0 = rng.integers(0, width - w), rng.integers(0, height - h)
    jitter = rng.integers(0, 8, size=4)
    points = [(x0 + jitter[0], y0), (x0 + w, y0 + jitter[1]), (x0 + w - jitter[2], y0 + h), (x0, y0 + h - jitter[3])]
    return [float(v) for p in points for v in p]


def _area(flat: list[float]) -> float:
    """Shoelace area of a flat [x1, y1, x2, y2, ...] polygon."""
    x, y = np.array(flat[0::2]), np.array(flat[1::2])
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def _split(root: Path, split: str, count: int, size: tuple[int, int], rng: np.random.Generator,
           first_ann: int) -> dict:
    width, height = size
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image_id = i + 1
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 4)):
            poly = _polygon(rng, width, height)
            category = CATEGORIES[int(rng.integers(0, len(CATEGORIES)))]
            draw.polygon(poly, fill=(255, 0, 0) if category["id"] == 1 else (0, 0, 255))
            xs, ys = poly[0::2], poly[1::2]
            annotations.append({"id": first_ann + len(annotations), "image_id": image_id,
                                "category_id": category["id"], "segmentation": [poly], "area": _area(poly),
                                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], "iscrowd": 0})
        name = f"{image_id:012d}.jpg"
        image.save(root / split / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    return {"images": images, "annotations": annotations, "categories": list(CATEGORIES)}


def write_coco(root: str | Path, train: int = 8, val: int = 4, size: tuple[int, int] = (160, 128),
               seed: int = 0) -> Path:
    """Write ``root/{annotations,train2017,val2017}`` with ``train``/``val`` images of ``size`` (w, h)."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    first_ann = 1
    for split, count in (("train2017", train), ("val2017", val)):
        data = _split(root, split, count, size, rng, first_ann)
        first_ann += len(data["annotations"])
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root
