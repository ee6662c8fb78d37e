"""COCO data and metric glue (mmdet 3.x datasets, mmdet's COCO metric over pycocotools).

Layout under ``--coco-root``: ``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/``.
Evaluation uses the authors' test pipeline (resize to 1333×800 keeping the aspect ratio, normalise, pad to 32,
one image per batch); compensation images are annotated train2017 images resized to exactly 224×224.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ...errors import InputError
from .configs import use_mmdet_registry
from .draw import DRAWS, aspect_groups, authors_draw, seeded_draw

#: The authors' test resize: longer side ≤ 1333, shorter side ≤ 800, aspect ratio kept.
TEST_SCALE = (1333, 800)
_META_KEYS = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")


def annotation_file(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


#: The splits a run reads: val2017 (PTQ calibration image and evaluation), train2017 (compensation images).
SPLITS = ("val2017", "train2017")


def check_coco(root: Path, splits: Sequence[str] = SPLITS) -> None:
    """Every annotation file and image folder of ``splits`` under ``root``, checked at once before any work,
    so a missing train2017 is not found only after the FP and PTQ evaluations."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--coco-root {root} is not a folder; pass the COCO root with annotations/, "
                         f"{'/, '.join(splits)}/")
    needed = [path for split in splits for path in (annotation_file(root, split), root / split)]
    missing = [f"{path}" if path.suffix == ".json" else f"{path}/" for path in needed
               if not (path.is_file() if path.suffix == ".json" else path.is_dir())]
    if missing:
        raise InputError(f"COCO under --coco-root {root} is incomplete, missing: {', '.join(missing)}")


def _pipeline(scale: tuple[int, int], keep_ratio: bool) -> list:
    """The transforms themselves (mmcv's loader, mmdet's Resize and PackDetInputs: what mmdet's registry names
    resolve to), so the pipeline does not depend on the process's default registry scope."""
    from mmcv.transforms import LoadImageFromFile
    from mmdet.datasets.transforms import PackDetInputs, Resize

    return [LoadImageFromFile(), Resize(scale=scale, keep_ratio=keep_ratio), PackDetInputs(meta_keys=_META_KEYS)]


def coco_dataset(root: Path, split: str, scale: tuple[int, int], keep_ratio: bool = True,
                 classes: Sequence[str] | None = None, annotated_only: bool = False,
                 limit: int | None = None):
    """mmdet ``CocoDataset`` of ``split`` through a test-style pipeline at ``scale``.

    ``annotated_only`` drops images without boxes (or smaller than 32 px), as mmdet's training set does;
    ``classes`` restricts the category names (synthetic sets); ``limit`` keeps the first images only.
    """
    from mmdet.datasets import CocoDataset

    check_coco(root, (split,))
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


def compensation_set(root: Path, count: int, size: int, draw: str = "seeded", seed: int = 0, world_size: int = 1,
                     classes: Sequence[str] | None = None):
    """The ``count`` annotated train2017 images QwT is fitted on, resized to ``size``×``size``, in fitting order.

    ``draw`` (:data:`.draw.DRAWS`): ``seeded`` with ``seed``, or ``authors``: the authors' sampler order under
    ``world_size`` processes (``seed`` does not change it). Built before any evaluation, so a count larger than
    the annotated images is refused before compute; only the drawn images' annotations are kept.
    """
    dataset = coco_dataset(root, "train2017", (size, size), keep_ratio=False, classes=classes, annotated_only=True)
    if count > len(dataset):
        raise InputError(f"--comp-images {count} exceeds the {len(dataset)} annotated train2017 images")
    if draw == "authors":
        sizes = ((info["width"], info["height"]) for info in map(dataset.get_data_info, range(len(dataset))))
        order = authors_draw(aspect_groups(list(sizes)), count, world_size)
    elif draw == "seeded":
        order = seeded_draw(len(dataset), count, seed)
    else:
        raise ValueError(f"unknown compensation draw {draw!r}; choose one of {DRAWS}")
    return DrawnImages(dataset, order)


class DrawnImages(Dataset):
    """The drawn images of a dataset, in draw order: an index view, nothing copied.

    Not mmengine's ``BaseDataset.get_subset``: in mmengine 0.10 it deep-copies the dataset through
    ``_copy_without_annotation(memo=dict())``, a mutable default shared by every call in the process. Once an
    object of an earlier copy is freed and Python reuses its id for a new one (a transform of the next dataset),
    the memo hands back the stale earlier object: the "copy" loads images through another dataset's pipeline
    (another resize, or not a transform at all)."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    def get_data_info(self, index: int) -> dict:
        return self.dataset.get_data_info(self.indices[index])


def compensation_images(model: nn.Module, images, batch_size: int, workers: int) -> Iterator[torch.Tensor]:
    """Normalised batches of the :func:`compensation_set` ``images``, in their order."""
    for batch in loader(images, batch_size, workers):
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
