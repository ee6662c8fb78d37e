"""A tiny synthetic class-folder dataset for smoke runs and tests (no real data needed).

Each class is a distinct colour/stripe pattern plus noise, so a model can in principle tell them apart.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_class_folders(root: str | Path, classes: int = 4, train_per_class: int = 40, val_per_class: int = 8,
                        size: int = 48, seed: int = 0) -> Path:
    """Write ``root/train/<class>/*.png`` and ``root/val/<class>/*.png``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            base = np.zeros((size, size, 3), dtype=np.float32)
            base[..., c % 3] = 160
            base[:, :: 2 + c] += 60
            for i in range(count):
                img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root
