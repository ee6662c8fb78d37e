"""COCO data and metric glue (mmdet 3.x datasets, mmdet's COCO metric over pycocotools).

Layout under ``--coco-root``: ``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/``.
Evaluation uses the authors' test pipeline (resize to 1333×800 keeping the aspect ratio, normalise, pad to 32,
one image per batch); compensation images are annotated train2017 images resized to exactly 224×224.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .configs import use_mmdet_registry

Config = dict[str, Any]

#: The authors' test resize: longer side ≤ 1333, shorter side ≤ 800, aspect ratio kept.
TEST_SCALE = (1333, 800)
_META_KEYS = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")


def annotation_file(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def _check_layout(root: Path, split: str) -> None:
    ann, images = annotation_file(root, split), Path(root) / split
    if not ann.is_file() or not images.is_dir():
        raise FileNotFoundError(f"COCO {split} not found: need {ann} and {images}/ under --coco-root {root}")


def _pipeline(scale: tuple[int, int], keep_ratio: bool) -> list[Config]:
    return [dict(type="LoadImageFromFile"), dict(type="Resize", scale=scale, keep_ratio=keep_ratio),
            dict(type="PackDetInputs", meta_keys=_META_KEYS)]


def coco_dataset(root: Path, split: str, scale: tuple[int, int], keep_ratio: bool = True,
                 classes: Sequence[str] | None = None, annotated_only: bool = False,
                 limit: int | None = None):
    """mmdet ``CocoDataset`` of ``split`` through a test-style pipeline at ``scale``.

    ``annotated_only`` drops images without boxes (or smaller than 32 px), as mmdet's training set does;
    ``classes`` restricts the category names (synthetic sets); ``limit`` keeps the first images only.
    """
    from mmdet.datasets import CocoDataset

    _check_layout(root, split)
    use_mmdet_registry()
    return CocoDataset(data_root=str(root), ann_file=str(annotation_file(root, split)),
                       data_prefix=dict(img=f"{split}/"), pipeline=_pipeline(scale, keep_ratio),
                       metainfo=None if classes is None else dict(classes=tuple(classes)),
                       test_mode=not annotated_only, indices=limit,
                       filter_cfg=dict(filter_empty_gt=True, min_size=32) if annotated_only else None)


def loader(dataset, batch_size: int = 1, workers: int = 2) -> DataLoader:
    """Unshuffled loader of mmdet data dicts (``model.test_step`` input)."""
    from mmengine.dataset import pseudo_collate

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=pseudo_collate, persistent_workers=False)


def compensation_images(model: nn.Module, root: Path, count: int, seed: int, size: int, batch_size: int,
                        workers: int, classes: Sequence[str] | None = None) -> Iterator[torch.Tensor]:
    """Normalised ``size``×``size`` batches of ``count`` annotated train2017 images, drawn with ``seed``.

    The authors shuffle without a seed; the draw here is reproducible.
    """
    dataset = coco_dataset(root, "train2017", (size, size), keep_ratio=False, classes=classes, annotated_only=True)
    if count > len(dataset):
        raise ValueError(f"--comp-images {count} exceeds the {len(dataset)} annotated train2017 images")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    subset = torch.utils.data.Subset(dataset, order)
    for batch in loader(subset, batch_size, workers):
        yield model.data_preprocessor(batch, False)["inputs"]


@torch.no_grad()
def evaluate(model: nn.Module, data: DataLoader, desc: str = "eval", progress: bool = True) -> tuple[float, float]:
    """COCO box and mask AP (percent, IoU 0.50:0.95) of ``model`` over every image of ``data``."""
    from mmdet.evaluation import CocoMetric
    from mmengine.evaluator import Evaluator

    dataset = data.dataset
    metric = CocoMetric(ann_file=dataset.ann_file, metric=["bbox", "segm"])
    metric.img_ids = [dataset.get_data_info(i)["img_id"] for i in range(len(dataset))]  # a --val-limit subset
    evaluator = Evaluator(metric)
    evaluator.dataset_meta = dataset.metainfo
    model.eval()
    for batch in tqdm(data, desc=desc, disable=not progress, leave=False):
        evaluator.process(model.test_step(batch), batch)
    result = evaluator.evaluate(len(dataset))
    return _ap(result, "coco/bbox_mAP", desc), _ap(result, "coco/segm_mAP", desc)


def _ap(result: dict[str, float], key: str, desc: str) -> float:
    """AP in percent; mmdet returns no value when no image got a detection, which is AP 0, not a crash."""
    if key not in result:
        warnings.warn(f"{desc}: no detections on any image, {key} recorded as 0", RuntimeWarning, stacklevel=2)
        return 0.0
    return 100.0 * result[key]
