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
from ...cli import check_device, check_writable_dir, hold_output_dir, positive_int, run_cli
from ...environment import environment
from ...errors import InputError
from ...experiment import check_qwt_config, compensated_blocks
from ...models.checkpoint import check_checkpoint
from ...ptq.config import bit_tag
from ...report import write_run
from ...utils import PhaseTimer, seed_everything
from ..cli import DETECTION, HelpFormatter, add_quant_flags, method_suffix, ptq_config, qwt_config

from .checkpoint import load_detector_weights
from .coco import TEST_SCALE, check_coco, coco_dataset, compensation_images, compensation_set, evaluate, loader
from .configs import MODELS, build_detector
from .draw import DRAWS
from .plan import COMP_SIZE, MMDET_SWIN, detector_forward, mmdet_swin_plan
from .synthetic import CLASSES, write_coco

Row = dict[str, Any]

#: Smoke runs: test resize of the small synthetic images, and compensation images drawn from them.
SMOKE_TEST_SCALE = (320, 256)
SMOKE_COMP_IMAGES = 8


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("detector and data")
    g.add_argument("--model", required=True, choices=sorted(MODELS), metavar="MODEL",
                   help="one of " + ", ".join(sorted(MODELS)))
    g.add_argument("--checkpoint", type=Path,
                   help="FP detector weights: Swin-Transformer-Object-Detection (mmdet 2.x) or mmdet 3.x .pth")
    g.add_argument("--coco-root", type=Path, help="COCO with annotations/, train2017/, val2017/")
    g.add_argument("--val-limit", type=positive_int, default=None,
                   help="evaluate on the first N val2017 images only (rows are labelled <model>-val<N>)")
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
                   help="images per compensation batch (the authors feed 1; another size changes only the rounding)")
    g = p.add_argument_group("run")
    g.add_argument("--skip-fp", action="store_true", help="do not evaluate the FP detector")
    g.add_argument("--workers", type=int, default=2, help="data loader processes")
    g.add_argument("--out", type=Path, default=Path("results/det"), help="folder of the run records")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds torch/numpy/random and the seeded compensation draw")
    g.add_argument("--smoke", action="store_true",
                   help="reduced random-init detector + synthetic COCO in a temp folder (CI)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run_label(args: argparse.Namespace) -> str:
    """The model name in rows and tables: another PTQ method (or method options), smoke and ``--val-limit`` runs
    are marked, so none can pass for a full val2017 RepQ-ViT result or match a paper row."""
    return (args.model + method_suffix(args, MMDET_SWIN, "-") + ("-smoke" if args.smoke else "")
            + (f"-val{args.val_limit}" if args.val_limit else ""))


def run_stem(args: argparse.Namespace) -> str:
    """File stem of a run's record: ``OUT/<stem>.json``."""
    return f"{run_label(args)}_{bit_tag(args.w_bits, args.a_bits, args.conv_act_bits)}"


def comp_count(args: argparse.Namespace) -> int:
    """How many compensation images the run fits on."""
    return args.comp_images or (SMOKE_COMP_IMAGES if args.smoke else 512)


def run(args: argparse.Namespace) -> list[Row]:
    """The three evaluations of one detector at one bit setting; returns the result rows.

    Every input is checked before the first evaluation: flags, checkpoint, output folder, every COCO split the
    run reads and the compensation draw."""
    check_device(args.device)
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
    check_writable_dir(args.out, "--out")
    check_qwt_config(qwt_config(args))
    seed_everything(args.seed)
    with hold_output_dir(args.out, "--out"), tempfile.TemporaryDirectory(prefix="qwt-det-smoke-") as tmp:
        classes = CLASSES if args.smoke else None
        root = args.coco_root or write_coco(tmp)
        return _run(args, root, classes)


def _run(args: argparse.Namespace, root: Path, classes: tuple[str, ...] | None) -> list[Row]:
    progress = not args.no_progress
    comp_images = comp_count(args)
    model = build_detector(args.model, smoke=args.smoke, num_classes=len(classes) if classes else 80)
    layout = load_detector_weights(model, args.checkpoint) if args.checkpoint else "random-init"
    model.to(args.device)
    qwt_cfg = qwt_config(args)
    check_qwt_config(qwt_cfg, compensated_blocks(mmdet_swin_plan(model, (COMP_SIZE, COMP_SIZE))))
    val_set = coco_dataset(root, "val2017", SMOKE_TEST_SCALE if args.smoke else TEST_SCALE, classes=classes,
                           limit=args.val_limit)
    val = loader(val_set, 1, args.workers)
    reading = PhaseTimer()  # the train2017 annotations are read (and the draw checked) before any evaluation
    comp_set = compensation_set(root, comp_images, COMP_SIZE, args.comp_draw, args.seed, args.world_size or 1,
                                classes)
    reading("comp_data")
    ptq_cfg = ptq_config(args, MMDET_SWIN)
    MMDET_SWIN.layer_rule(model, ptq_cfg)  # refuses settings the family does not take, before the FP evaluation
    label = run_label(args)
    env = {**environment(args.device), "mmdet": mmdet.__version__, "mmengine": mmengine.__version__}
    draw = {"draw": args.comp_draw, **({"world_size": args.world_size or 1} if args.comp_draw == "authors" else {})}
    data = {"val_images": len(val_set), "comp_images": comp_images, "comp_draw": draw}
    details: dict[str, Any] = {"checkpoint_layout": layout, "comp_images": comp_images, "comp_draw": draw,
                               "comp_data_seconds": reading.total, "ptq": ptq_cfg.to_dict(), "qwt": asdict(qwt_cfg)}
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
    images = compensation_images(model, comp_set, args.comp_batch_size, args.workers)
    blocks = apply_qwt(model, images, qwt_cfg, plan=mmdet_swin_plan(model, (COMP_SIZE, COMP_SIZE)),
                       progress=progress)
    timer("qwt")
    add(ptq_cfg.tag, "ptq+qwt", timer.total)
    details.update({"phases": timer.phases, "blocks": [b.to_dict() for b in blocks]})
    write_run(args.out, run_stem(args), rows, details, args, env, complete=True, data=data)
    return rows


def main(description: str, argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(description).parse_args(argv))
