"""One detection run: FP → RepQ-ViT (whole detector, one val image) → QwT (backbone blocks, 224×224 train
images) with COCO box and mask AP after each, as the authors' ``tools/test.py`` does in one process.

Rows go to ``OUT/<model>_<bits>.json`` (``model``, ``bits``, ``method``, ``box_ap``, ``mask_ap``,
``calib_seconds``); per-block R² and the configuration to ``OUT/details/``. ``--smoke`` writes a synthetic COCO
set to a temporary folder and uses a reduced random-init detector of the same architecture.
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mmdet
import mmengine
import torch

from ...api import apply_qwt, quantize
from ...cli import check_device, check_writable_dir, positive_int, run_cli
from ...environment import environment
from ...errors import InputError
from ...experiment import check_qwt_config, compensated_blocks
from ...models.checkpoint import check_checkpoint
from ...ptq.config import bit_tag
from ...report import write_run
from ...utils import PhaseTimer, seed_everything
from ..cli import DETECTION, add_quant_flags, ptq_config, qwt_config

from .checkpoint import load_detector_weights
from .coco import TEST_SCALE, coco_dataset, compensation_images, evaluate, loader
from .configs import MODELS, build_detector
from .plan import COMP_SIZE, MMDET_SWIN, detector_forward, mmdet_swin_plan
from .synthetic import CLASSES, write_coco

Row = dict[str, Any]

#: Smoke runs: test resize of the small synthetic images, and compensation images drawn from them.
SMOKE_TEST_SCALE = (320, 256)
SMOKE_COMP_IMAGES = 8


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--checkpoint", type=Path,
                   help="FP detector weights: Swin-Transformer-Object-Detection (mmdet 2.x) or mmdet 3.x .pth")
    p.add_argument("--coco-root", type=Path, help="COCO with annotations/, train2017/, val2017/")
    add_quant_flags(p, DETECTION)
    p.add_argument("--comp-images", type=positive_int, default=None,
                   help=f"train2017 images for QwT (default 512; {SMOKE_COMP_IMAGES} with --smoke)")
    p.add_argument("--comp-batch-size", type=positive_int, default=16,
                   help="images per compensation batch (the fit does not depend on it)")
    p.add_argument("--val-limit", type=positive_int, default=None,
                   help="evaluate on the first N val2017 images only (rows are labelled <model>-val<N>)")
    p.add_argument("--skip-fp", action="store_true", help="do not evaluate the FP detector")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results/det"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="seeds torch/numpy/random and the compensation subset")
    p.add_argument("--smoke", action="store_true",
                   help="reduced random-init detector + synthetic COCO in a temp folder (CI)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run_label(args: argparse.Namespace) -> str:
    """The model name in rows and tables: smoke and ``--val-limit`` runs are marked, so neither can pass for a
    full val2017 result or match a paper row."""
    return args.model + ("-smoke" if args.smoke else "") + (f"-val{args.val_limit}" if args.val_limit else "")


def run_stem(args: argparse.Namespace) -> str:
    """File stem of a run's record: ``OUT/<stem>.json``."""
    return f"{run_label(args)}_{bit_tag(args.w_bits, args.a_bits, args.conv_act_bits)}"


def run(args: argparse.Namespace) -> list[Row]:
    """The three evaluations of one detector at one bit setting; returns the result rows."""
    check_device(args.device)
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint)
    elif not args.smoke:
        raise InputError("--checkpoint is required (the FP detector weights), or use --smoke")
    if args.coco_root is None and not args.smoke:
        raise InputError("--coco-root is required (COCO with annotations/, train2017/, val2017/), or use --smoke")
    check_writable_dir(args.out, "--out")
    check_qwt_config(qwt_config(args))
    seed_everything(args.seed)
    with tempfile.TemporaryDirectory(prefix="qwt-det-smoke-") as tmp:
        classes = CLASSES if args.smoke else None
        root = args.coco_root or write_coco(tmp)
        return _run(args, root, classes)


def _run(args: argparse.Namespace, root: Path, classes: tuple[str, ...] | None) -> list[Row]:
    progress = not args.no_progress
    comp_images = args.comp_images or (SMOKE_COMP_IMAGES if args.smoke else 512)
    model = build_detector(args.model, smoke=args.smoke, num_classes=len(classes) if classes else 80)
    layout = load_detector_weights(model, args.checkpoint) if args.checkpoint else "random-init"
    model.to(args.device)
    qwt_cfg = qwt_config(args)
    check_qwt_config(qwt_cfg, compensated_blocks(mmdet_swin_plan(model, (COMP_SIZE, COMP_SIZE))))
    val_set = coco_dataset(root, "val2017", SMOKE_TEST_SCALE if args.smoke else TEST_SCALE, classes=classes,
                           limit=args.val_limit)
    val = loader(val_set, 1, args.workers)
    ptq_cfg = ptq_config(args, MMDET_SWIN)
    MMDET_SWIN.layer_rule(model, ptq_cfg)  # refuses settings the family does not take, before the FP evaluation
    label = run_label(args)
    env = {**environment(args.device), "mmdet": mmdet.__version__, "mmengine": mmengine.__version__}
    data = {"val_images": len(val_set), "comp_images": comp_images}
    details: dict[str, Any] = {"checkpoint_layout": layout, "comp_images": comp_images, "ptq": ptq_cfg.to_dict(),
                               "qwt": asdict(qwt_cfg)}
    rows: list[Row] = []

    def add(bits: str, method: str, seconds: float) -> None:
        box, mask = evaluate(model, val, f"{label} {bits} {method}", progress)
        print(f"{label} {bits} {method}: box AP {box:.1f}, mask AP {mask:.1f}", flush=True)
        rows.append({"model": label, "bits": bits, "method": method, "box_ap": box, "mask_ap": mask,
                     "calib_seconds": seconds})
        write_run(args.out, run_stem(args), rows, details, args, env, complete=False, data=data)

    if not args.skip_fp:
        add("FP", "fp", 0.0)
    timer = PhaseTimer()
    quantize(model, next(iter(val)), ptq_cfg, family=MMDET_SWIN, forward=detector_forward, on_phase=timer)
    add(ptq_cfg.tag, "ptq", timer.total)
    timer.restart()
    images = compensation_images(model, root, comp_images, args.seed, COMP_SIZE, args.comp_batch_size,
                                 args.workers, classes)
    blocks = apply_qwt(model, images, qwt_cfg, plan=mmdet_swin_plan(model, (COMP_SIZE, COMP_SIZE)),
                       progress=progress)
    timer("qwt")
    add(ptq_cfg.tag, "ptq+qwt", timer.total)
    details.update({"phases": timer.phases, "blocks": [b.to_dict() for b in blocks]})
    write_run(args.out, run_stem(args), rows, details, args, env, complete=True, data=data)
    return rows


def main(description: str, argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(description).parse_args(argv))
