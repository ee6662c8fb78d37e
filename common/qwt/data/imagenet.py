"""ImageNet-style class-folder data: transforms from a model's preprocessing and the three loaders a QwT run needs.

Layout: ``DATA_DIR/train/<class>/*.JPEG`` and ``DATA_DIR/val/<class>/*.JPEG``. Evaluation uses the authors'
``large_scale_test`` transform (resize short side to 224/crop_pct, bicubic, centre crop); calibration and
compensation images come from the shuffled train split through ``large_scale_train`` (RandomResizedCrop, flip,
RandAugment ``rand-m9-mstd0.5-inc1``), drawn by two independent iterators as in the authors' code.
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from ..errors import InputError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Preprocessing:
    """Input statistics and centre-crop ratio of an ImageNet model (docs/algorithm.md#evaluation)."""

    crop_pct: float
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size: int = 224


def eval_transform(pre: Preprocessing) -> Callable:
    return transforms.Compose([
        transforms.Resize(int(pre.size / pre.crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(pre.size),
        transforms.ToTensor(),
        transforms.Normalize(pre.mean, pre.std),
    ])


def train_transform(pre: Preprocessing) -> Callable:
    from timm.data.auto_augment import rand_augment_transform

    fill = tuple(round(255 * m) for m in pre.mean)
    return transforms.Compose([
        transforms.RandomResizedCrop(pre.size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        rand_augment_transform("rand-m9-mstd0.5-inc1", {"translate_const": 100, "img_mean": fill}),
        transforms.ToTensor(),
        transforms.Normalize(pre.mean, pre.std),
    ])


def _load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"corrupt or unreadable image {path}: {err}; remove or replace the file") from err


def _regular_image_file(path: str) -> bool:
    """ImageFolder's rule (an image extension), refusing what is not a regular file: reading a FIFO named
    ``*.png`` would block the run forever, a device would never end."""
    if not has_file_allowed_extension(path, IMG_EXTENSIONS):
        return False
    if not os.path.isfile(path):
        raise InputError(f"{path} is not a regular file (a FIFO, socket or device): remove it from the dataset "
                         "folder")
    return True


def class_folder(root: str | Path, split: str, transform: Callable) -> Dataset:
    """An ImageFolder over ``root/split`` with a clear error for a wrong path or a corrupt image."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} not found: --data-dir must contain train/ and val/ class folders "
            "(e.g. train/n01440764/*.JPEG)")
    try:
        return datasets.ImageFolder(str(folder), transform=transform, loader=_load_rgb,
                                    is_valid_file=_regular_image_file)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{folder}: no class folders with images ({err})") from None


class SeededSubset(Dataset):
    """``dataset[indices[k]]`` with the random augmentation seeded by (seed, index).

    Each image's augmentation then no longer depends on the order images are drawn in, so one process and
    several ranks (or workers) see exactly the same calibration and compensation images.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], seed: int) -> None:
        self.dataset, self.indices, self.seed = dataset, list(indices), seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        index = self.indices[k]
        seed = self.seed * 1_000_003 + index
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            # torchvision draws from torch, timm's RandAugment from python's random and numpy.
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


@dataclass
class QwTLoaders:
    calib: torch.Tensor  # PTQ calibration batch (images only)
    comp: DataLoader  # QwT compensation batches, a fresh iterator over the shuffled train split
    val: DataLoader
    classes: list[str]
    counts: dict[str, int]  # images actually used (all ranks together): calib, comp, val, and val_total


def _summary(names: Sequence[str]) -> str:
    shown = ", ".join(names[:3]) + (f", … {names[-1]}" if len(names) > 3 else "")
    return f"{len(names)} classes ({shown})" if names else "no classes"


def check_classes(train: Sequence[str], val: Sequence[str], head: int | None) -> None:
    """Refuse a val split whose class folders differ from train's, or a class count the head cannot score:
    labels would then index the wrong logits and top-1 would be meaningless (0.00 % on a 4-class folder
    under a 1000-class head)."""
    problems = []
    if list(train) != list(val):
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        problems.append(f"train/ has {_summary(list(train))} and val/ has {_summary(list(val))}"
                        + (f"; missing in val/: {_summary(only_train)}" if only_train else "")
                        + (f"; not in train/: {_summary(only_val)}" if only_val else ""))
    if head is not None and len(val) != head:
        problems.append(f"the model's head scores {head} classes but val/ has {_summary(list(val))}")
    if problems:
        raise InputError("class folders do not match: " + "; ".join(problems))


def make_loaders(root: str | Path, pre: Preprocessing, calib_images: int = 32, comp_images: int = 512,
                 batch_size: int = 32, workers: int = 4, seed: int = 0, val_limit: int | None = None,
                 rank: int = 0, world_size: int = 1, head_classes: int | None = None) -> QwTLoaders:
    """The authors' data: calibration = first shuffled train batch; compensation = the first ``comp_images``
    of a second shuffled pass (independent of the first); validation unshuffled.

    With ``world_size`` > 1 each rank takes its share of the compensation images and every world_size-th
    validation image; the calibration batch is the same on every rank. Class folders are checked against each
    other and against ``head_classes`` before any image is read; a ``comp_images`` larger than the train split
    is used as far as it goes, and ``counts`` records what was used.
    """
    for name, value in (("calib_images", calib_images), ("comp_images", comp_images), ("batch_size", batch_size)):
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    if val_limit is not None and val_limit < 1:
        raise InputError(f"val_limit must be at least 1, got {val_limit}")
    train = class_folder(root, "train", train_transform(pre))
    val = class_folder(root, "val", eval_transform(pre))
    check_classes(train.classes, val.classes, head_classes)
    classes = list(val.classes)
    n_val = len(val) if val_limit is None else min(val_limit, len(val))
    counts = {"calib": calib_images, "comp": min(len(train), comp_images // world_size * world_size),
              "val": n_val, "val_total": len(val)}
    if n_val < len(val) or world_size > 1:
        val = torch.utils.data.Subset(val, range(rank, n_val, world_size))
    if len(train) < calib_images:
        raise InputError(f"{root}/train has {len(train)} images; PTQ calibration needs at least {calib_images}")
    gen = torch.Generator().manual_seed(seed)
    calib_order = torch.randperm(len(train), generator=gen)[:calib_images].tolist()
    calib_set = SeededSubset(train, calib_order, seed)
    calib = torch.stack([calib_set[k][0] for k in range(len(calib_set))])
    share = comp_images // world_size
    order = torch.randperm(len(train), generator=gen)[rank * share:(rank + 1) * share]
    comp = DataLoader(SeededSubset(train, order.tolist(), seed), batch_size=batch_size, num_workers=workers)
    val_loader = DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=workers)
    return QwTLoaders(calib=calib, comp=comp, val=val_loader, classes=classes, counts=counts)
