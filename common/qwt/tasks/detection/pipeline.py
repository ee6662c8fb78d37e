"""COCO detection as a task of the run protocol: FP → RepQ-ViT (whole detector, one val image) → QwT (backbone
blocks, 224×224 train images) with COCO box and mask AP after each, as the authors' ``tools/test.py`` does in one
process. ``--smoke`` writes a synthetic COCO set to a temporary folder and uses a reduced random-init detector of
the same architecture.
"""
from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import mmdet
import mmengine
from torch import nn

from ...api import apply_qwt, quantize
from ...cli import positive_int
from ...compensation import BlockReport, QwTConfig
from ...errors import InputError
from ...models.checkpoint import check_checkpoint
from ...ptq import PTQConfig
from ...ptq.config import bit_tag
from ...report import Column
from ...utils import PhaseTimer
from .. import protocol
from ..cli import DETECTION, add_quant_flags, method_suffix, ptq_config, qwt_config

from .checkpoint import load_detector_weights
from .coco import TEST_SCALE, check_coco, coco_dataset, compensation_images, compensation_set, evaluate, loader
from .configs import MODELS, build_detector
from .draw import DRAWS
from .plan import COMP_SIZE, MMDET_SWIN, detector_forward, mmdet_swin_plan
from .synthetic import CLASSES, write_coco

#: Smoke runs: test resize of the small synthetic images, and compensation images drawn from them.
SMOKE_TEST_SCALE = (320, 256)
SMOKE_COMP_IMAGES = 8


class Detection(protocol.Task):
    name, out = "detection", "results/det"
    columns: ClassVar[tuple[Column, ...]] = (Column("box_ap", "box AP", 1), Column("mask_ap", "mask AP", 1))

    def add_flags(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("detector and data")
        g.add_argument("--model", required=True, choices=sorted(MODELS), metavar="MODEL",
                       help="one of " + ", ".join(sorted(MODELS)))
        g.add_argument("--checkpoint", type=Path,
                       help="FP detector weights: Swin-Transformer-Object-Detection (mmdet 2.x) or mmdet 3.x .pth")
        g.add_argument("--coco-root", type=Path, help="COCO with annotations/, train2017/, val2017/")
        g.add_argument("--val-limit", type=positive_int, default=None,
                       help="evaluate on the first N val2017 images only (rows are labelled <model>-val<N>)")
        g.add_argument("--smoke", action="store_true",
                       help="reduced random-init detector + synthetic COCO in a temp folder (CI)")
        g.add_argument("--workers", type=int, default=2, help="data loader processes")
        add_quant_flags(p, DETECTION)
        g = p.add_argument_group("compensation images (annotated train2017, 224×224)")
        g.add_argument("--comp-images", type=positive_int, default=None,
                       help=f"how many (default 512; {SMOKE_COMP_IMAGES} with --smoke)")
        g.add_argument("--comp-draw", choices=DRAWS, default="seeded",
                       help="seeded: a permutation drawn with --seed; authors: the authors' draw (mmdet 2.x's "
                            "DistributedGroupSampler, seed 0, under their tools/dist_test.sh launch)")
        g.add_argument("--world-size", type=positive_int, default=None,
                       help="with --comp-draw authors: the number of GPUs of the authors' launch to reproduce "
                            "(each takes comp_images / world_size images; default 1)")
        g.add_argument("--comp-batch-size", type=positive_int, default=16,
                       help="images per compensation batch (the authors feed 1; another size changes only the "
                            "rounding)")

    def settings(self, args: argparse.Namespace) -> list[PTQConfig]:
        return [ptq_config(args, MMDET_SWIN)]

    def qwt_configs(self, args: argparse.Namespace) -> list[QwTConfig]:
        return [qwt_config(args)]

    def check(self, args: argparse.Namespace) -> None:
        """Flags, checkpoint and every COCO split the run reads, before the first evaluation."""
        if args.checkpoint is not None:
            check_checkpoint(args.checkpoint)
        elif not args.smoke:
            raise InputError("--checkpoint is required (the FP detector weights), or use --smoke")
        if args.coco_root is None and not args.smoke:
            raise InputError("--coco-root is required (COCO with annotations/, train2017/, val2017/), or use --smoke")
        if args.coco_root is not None:
            check_coco(args.coco_root)
        if args.world_size is not None and args.comp_draw != "authors":
            raise InputError("--world-size only applies to --comp-draw authors (the authors' draw under N GPUs)")

    def stem(self, args: argparse.Namespace) -> str:
        return f"{run_label(args)}_{bit_tag(args.w_bits, args.a_bits, args.conv_act_bits)}"

    def title(self, args: argparse.Namespace) -> str:
        return f"COCO detection: {run_label(args)}"

    @contextmanager
    def open(self, args: argparse.Namespace, rank: int, world: int) -> Iterator[protocol.Session]:
        with tempfile.TemporaryDirectory(prefix="qwt-det-smoke-") as tmp:
            classes = CLASSES if args.smoke else None
            yield DetectionSession(args, args.coco_root or write_coco(tmp), classes)


def run_label(args: argparse.Namespace) -> str:
    """The model name in rows and tables: another PTQ method (or method options), smoke and ``--val-limit`` runs
    are marked, so none can pass for a full val2017 RepQ-ViT result or match a paper row."""
    return (args.model + method_suffix(args, MMDET_SWIN, "-") + ("-smoke" if args.smoke else "")
            + (f"-val{args.val_limit}" if args.val_limit else ""))


def comp_count(args: argparse.Namespace) -> int:
    """How many compensation images the run fits on."""
    return args.comp_images or (SMOKE_COMP_IMAGES if args.smoke else 512)


@dataclass
class DetectionSession(protocol.Session):
    args: argparse.Namespace
    root: Path
    classes: tuple[str, ...] | None

    def __post_init__(self) -> None:
        args = self.args
        self.label, self.progress = run_label(args), not args.no_progress
        model = build_detector(args.model, smoke=args.smoke, num_classes=len(self.classes) if self.classes else 80)
        layout = load_detector_weights(model, args.checkpoint) if args.checkpoint else "random-init"
        self.fp_model = model.to(args.device)
        val_set = coco_dataset(self.root, "val2017", SMOKE_TEST_SCALE if args.smoke else TEST_SCALE,
                               classes=self.classes, limit=args.val_limit)
        self.val = loader(val_set, 1, args.workers)
        reading = PhaseTimer()  # the train2017 annotations are read (and the draw checked) before any evaluation
        self.comp_set = compensation_set(self.root, comp_count(args), COMP_SIZE, args.comp_draw, args.seed,
                                         args.world_size or 1, self.classes)
        reading("comp_data")
        self.family = MMDET_SWIN
        draw = {"draw": args.comp_draw, **({"world_size": args.world_size or 1} if args.comp_draw == "authors" else {})}
        self.data = {"val_images": len(val_set), "comp_images": comp_count(args), "comp_draw": draw,
                     "comp_data_seconds": reading.total, "checkpoint_layout": layout,
                     "mmdet": mmdet.__version__, "mmengine": mmengine.__version__}

    def evaluate(self, model: nn.Module, desc: str) -> dict[str, float]:
        box, mask = evaluate(model, self.val, f"{self.label} {desc}", self.progress)
        return {"box_ap": box, "mask_ap": mask}

    def quantize(self, model: nn.Module, config: PTQConfig, on_phase: PhaseTimer) -> None:
        """Calibrated on the first val image through the detector's own test forward, as the authors do."""
        quantize(model, next(iter(self.val)), config, family=MMDET_SWIN, forward=detector_forward, on_phase=on_phase)

    def compensate(self, model: nn.Module, config: QwTConfig) -> list[BlockReport]:
        images = compensation_images(model, self.comp_set, self.args.comp_batch_size, self.args.workers)
        return apply_qwt(model, images, config, plan=mmdet_swin_plan(model, (COMP_SIZE, COMP_SIZE)),
                         progress=self.progress)


def main(description: str, argv: list[str] | None = None) -> int:
    return protocol.main(Detection(), description, argv)
