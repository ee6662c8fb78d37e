"""ImageNet classification (``QwT-cls-RepQ-ViT``, ``QwT-cls-ResNet``) as a task of the run protocol.

One run: one model at one bit setting; FP top-1 → PTQ (the family's baseline, or ``--method``) → QwT → optional
QwT* (fine-tuned compensation and head). ``--smoke`` swaps in a reduced random-init model of the same class and a
synthetic class-folder dataset, so the whole path runs on CPU in seconds. Works under ``torchrun``: compensation
images are split across ranks and the solver statistics are all-reduced, so every rank solves the same system as
a single process would; top-1 counts are summed over the ranks' validation shards.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from ..cli import positive_int
from ..compensation import QwTConfig
from ..data.imagenet import QwTLoaders, SeededSubset, make_loaders
from ..data.synthetic import write_class_folders
from ..errors import InputError
from ..evaluate import top1_accuracy
from ..finetune import FinetuneConfig, ShardedBatches, finetune
from ..models import ModelEntry, get_model_entry, list_models
from ..models.checkpoint import check_checkpoint
from ..ptq import PTQConfig
from ..ptq.config import bit_tag
from ..report import Column, Row
from . import protocol
from .cli import CLASSIFICATION, add_quant_flags, method_suffix, ptq_config, qwt_config

FAMILIES = {"vit": ("vit", "swin"), "resnet": ("resnet",)}


class Classification(protocol.Task):
    """``kind``: ``vit`` (ViT/DeiT/Swin) or ``resnet``: which registered models the command line offers."""

    columns: ClassVar[tuple[Column, ...]] = (Column("top1", "top-1"),)
    saves: ClassVar[bool] = True

    def __init__(self, kind: str) -> None:
        self.kind, self.name, self.out = kind, f"classification-{kind}", f"results/cls_{kind}"

    def add_flags(self, p: argparse.ArgumentParser) -> None:
        models = [m for m in list_models() if get_model_entry(m).preprocessing
                  and get_model_entry(m).family.name in FAMILIES[self.kind]]
        g = p.add_argument_group("model and data")
        g.add_argument("--model", required=True, choices=models, metavar="MODEL", help="one of " + ", ".join(models))
        g.add_argument("--data-dir", type=Path, help="ImageNet root with train/ and val/ class folders")
        g.add_argument("--checkpoint", type=Path,
                       help="FP weights (safetensors, or a weights-only .pth/.pth.tar)")
        g.add_argument("--calib-images", type=positive_int, default=32)
        g.add_argument("--comp-images", type=positive_int, default=512,
                       help="QwT images; with fewer train images, all are used and the record says how many")
        g.add_argument("--batch-size", type=positive_int, default=32)
        g.add_argument("--workers", type=int, default=4)
        g.add_argument("--val-limit", type=positive_int, default=None,
                       help="evaluate on the first N val images only (rows are labelled <model>-val<N>)")
        g.add_argument("--smoke", action="store_true",
                       help="reduced random-init model + synthetic data written to a temp folder (CI)")
        add_quant_flags(p, CLASSIFICATION)
        g = p.add_argument_group("QwT* (fine-tuned compensation and head)")
        g.add_argument("--qwt-star", action="store_true", help="also run QwT*")
        g.add_argument("--star-epochs", type=positive_int, default=1)
        g.add_argument("--star-lr", type=float, default=1e-4)
        g.add_argument("--star-weight-decay", type=float, default=0.0)
        g.add_argument("--star-temperature", type=float, default=1.0)
        g.add_argument("--star-label-weight", type=float, default=0.0, help="0: pure distillation from FP logits")
        g.add_argument("--star-max-steps", type=positive_int, default=None,
                       help="cap on QwT* steps (default: full epochs)")

    def settings(self, args: argparse.Namespace) -> list[PTQConfig]:
        return [ptq_config(args, get_model_entry(args.model).family)]

    def qwt_configs(self, args: argparse.Namespace) -> list[QwTConfig]:
        star_config(args)  # refused now, not after the run
        return [qwt_config(args)]

    def check(self, args: argparse.Namespace) -> None:
        if args.checkpoint is not None:
            check_checkpoint(args.checkpoint)
        if args.data_dir is None and not args.smoke:
            raise InputError("--data-dir is required (ImageNet with train/ and val/), or use --smoke")

    def stem(self, args: argparse.Namespace) -> str:
        subset = f"_val{args.val_limit}" if args.val_limit else ""
        bits = bit_tag(args.w_bits, args.a_bits, args.conv_act_bits)
        method = method_suffix(args, get_model_entry(args.model).family, "_")
        return f"{args.model}_{bits}{method}{'_smoke' if args.smoke else ''}{subset}"

    def title(self, args: argparse.Namespace) -> str:
        return f"ImageNet classification: {run_label(args)}"

    @contextmanager
    def open(self, args: argparse.Namespace, rank: int, world: int) -> Iterator[protocol.Session]:
        entry = get_model_entry(args.model)
        pre, data_dir = entry.preprocessing, args.data_dir
        with tempfile.TemporaryDirectory(prefix="qwt-smoke-") as tmp:
            if args.smoke:
                pre = replace(pre, size=32)
                data_dir = data_dir or write_class_folders(tmp, classes=4, train_per_class=24, val_per_class=8)
            loaders = make_loaders(data_dir, pre, args.calib_images, args.comp_images, args.batch_size,
                                   args.workers, args.seed, args.val_limit, rank, world, None if args.smoke else 1000)
            yield ClassificationSession(args, entry, loaders, rank, world)


def run_label(args: argparse.Namespace) -> str:
    """The model name in rows and tables: another baseline, smoke and ``--val-limit`` runs are marked, so none can
    pass for a full-data result of the paper's baseline."""
    family = get_model_entry(args.model).family
    return (args.model + method_suffix(args, family, "-") + ("-smoke" if args.smoke else "")
            + (f"-val{args.val_limit}" if args.val_limit else ""))


def star_config(args: argparse.Namespace) -> FinetuneConfig | None:
    """The QwT* settings, or None without ``--qwt-star``."""
    if not args.qwt_star:
        return None
    return FinetuneConfig(epochs=args.star_epochs, lr=args.star_lr, weight_decay=args.star_weight_decay,
                          temperature=args.star_temperature, label_weight=args.star_label_weight,
                          max_steps=args.star_max_steps)


@dataclass
class ClassificationSession(protocol.Session):
    args: argparse.Namespace
    entry: ModelEntry
    loaders: QwTLoaders
    rank: int
    world: int

    def __post_init__(self) -> None:
        args, loaders = self.args, self.loaders
        self.label, self.batch_size = run_label(args), args.batch_size
        self.progress = not args.no_progress and self.rank == 0
        self.data = dict(loaders.counts)
        if loaders.counts["comp"] < args.comp_images and self.rank == 0:
            print(f"warning: --comp-images {args.comp_images}: only {loaders.counts['comp']} train images are used "
                  "(recorded in the run's data counts)", file=sys.stderr, flush=True)
        classes = len(loaders.classes)
        self.fp_model = self.entry.build(pretrained=True, checkpoint=args.checkpoint, smoke=args.smoke,
                                         num_classes=classes if args.smoke else 1000).to(args.device)
        self.family = self.entry.family
        self.calib = loaders.calib.to(args.device)

    @property
    def comp(self) -> Iterator:  # a fresh pass over the compensation loader for each form
        return ((x.to(self.args.device), y) for x, y in self.loaders.comp)

    def evaluate(self, model: nn.Module, desc: str) -> dict[str, float]:
        """Top-1 over the whole val set: each rank holds a shard (see make_loaders); counts are summed."""
        loader = self.loaders.val
        acc = top1_accuracy(model, loader, len(loader), self.args.device, desc, self.progress)
        if self.world > 1:
            seen = len(loader.dataset)
            t = torch.tensor([acc * seen / 100.0, float(seen)], dtype=torch.float64, device=self.args.device)
            dist.all_reduce(t)
            acc = 100.0 * float(t[0] / t[1])
        return {"top1": acc}

    def refine(self, fp_model: nn.Module, model: nn.Module) -> nn.Module | None:
        """QwT*: the batches one process would draw (shuffled, drop_last), each rank taking its share; augmentation
        seeded per image, so that it does not depend on which rank or worker loads the image."""
        config = star_config(self.args)
        if config is None:
            return None
        star, args = copy.deepcopy(model), self.args
        train_set = self.loaders.comp.dataset.dataset
        dataset = SeededSubset(train_set, range(len(train_set)), args.seed + 1)
        gen = torch.Generator().manual_seed(args.seed + 1)
        batches = BatchSampler(RandomSampler(dataset, generator=gen), args.batch_size, drop_last=True)
        train = DataLoader(dataset, batch_sampler=ShardedBatches(batches, self.rank, self.world),
                           num_workers=args.workers, generator=gen)
        finetune(star, fp_model, train, len(train), config, args.device, self.progress)
        return star

    def save(self, model: nn.Module, path: Path, config: PTQConfig, row: Row) -> None:
        build = {"smoke": True, "num_classes": len(self.loaders.classes)} if self.args.smoke else {}
        protocol.save_compensated(model, path, self.args.model, config, build, row)


def main(kind: str, description: str, argv: list[str] | None = None) -> int:
    return protocol.main(Classification(kind), description, argv)
