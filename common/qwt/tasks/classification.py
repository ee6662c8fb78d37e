"""The ImageNet classification task runner shared by ``QwT-cls-RepQ-ViT`` and ``QwT-cls-ResNet``.

One run: FP top-1 → PTQ (RepQ-ViT or percentile) → QwT → optional QwT*; rows (model, bits, method, top1,
calib_seconds, size_mb) to the run record ``OUT/<model>_<bits>.json`` as each is computed (see
:func:`qwt.report.write_run`) and a markdown table. Inputs are checked before any compute. ``--smoke`` swaps in a
reduced random-init model of the same class and a synthetic class-folder dataset, so the whole path runs on CPU
in seconds. Works under ``torchrun``: compensation images are split across ranks and the solver statistics are
all-reduced, so every rank solves the same system as a single process would.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from ..cli import check_device, check_writable_dir, hold_output_dir, positive_int, run_cli
from ..compensation import BlockReport, QwTConfig
from ..data.imagenet import QwTLoaders, SeededSubset, make_loaders
from ..data.synthetic import write_class_folders
from ..environment import environment
from ..errors import InputError
from ..evaluate import top1_accuracy
from ..experiment import check_qwt_config, compensated_blocks, ptq_then_qwt
from ..finetune import FinetuneConfig, ShardedBatches, finetune
from ..models import ModelEntry, get_model_entry, list_models
from ..models.checkpoint import check_checkpoint
from ..ptq import PTQConfig
from ..ptq.config import bit_tag
from ..report import atomic_write, markdown_table, write_run
from ..serialization import check_save_target, save_quantized
from ..utils import seed_everything
from .cli import CLASSIFICATION, add_quant_flags, init_distributed, method_suffix, ptq_config, qwt_config

TASKS: dict[str, dict[str, Any]] = {
    "vit": {"out": "results/cls_vit", "families": ("vit", "swin")},
    "resnet": {"out": "results/cls_resnet", "families": ("resnet",)},
}


def build_parser(task: str, description: str) -> argparse.ArgumentParser:
    defaults = TASKS[task]
    models = [m for m in list_models() if get_model_entry(m).preprocessing
              and get_model_entry(m).family.name in defaults["families"]]
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, choices=models)
    p.add_argument("--data-dir", type=Path, help="ImageNet root with train/ and val/ class folders")
    p.add_argument("--checkpoint", type=Path, help="FP weights (safetensors, or a weights-only .pth/.pth.tar)")
    add_quant_flags(p, CLASSIFICATION)
    p.add_argument("--calib-images", type=positive_int, default=32)
    p.add_argument("--comp-images", type=positive_int, default=512,
                   help="QwT images; with fewer train images, all are used and the record says how many")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--val-limit", type=positive_int, default=None,
                   help="evaluate on the first N val images only (rows are labelled <model>-val<N>)")
    p.add_argument("--qwt-star", action="store_true", help="also run QwT* (fine-tune compensation + head)")
    p.add_argument("--star-epochs", type=positive_int, default=1)
    p.add_argument("--star-lr", type=float, default=1e-4)
    p.add_argument("--star-weight-decay", type=float, default=0.0)
    p.add_argument("--star-temperature", type=float, default=1.0)
    p.add_argument("--star-label-weight", type=float, default=0.0, help="0: pure distillation from FP logits")
    p.add_argument("--star-max-steps", type=positive_int, default=None, help="cap on QwT* steps (default: full epochs)")
    p.add_argument("--skip-fp", action="store_true", help="do not evaluate the FP model")
    p.add_argument("--save", type=Path, help="save the PTQ+QwT model (safetensors + json) to this folder")
    p.add_argument("--out", type=Path, default=Path(defaults["out"]))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="reduced random-init model + synthetic data written to a temp folder (CI)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _sharded_eval(model: nn.Module, loader, device: str, world: int, desc: str, progress: bool) -> float:
    """Top-1 over the whole val set: each rank holds a shard (see make_loaders); counts are summed."""
    acc = top1_accuracy(model, loader, len(loader), device, desc, progress)
    if world == 1:
        return acc
    seen = len(loader.dataset)
    t = torch.tensor([acc * seen / 100.0, float(seen)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return 100.0 * float(t[0] / t[1])


def run_label(args: argparse.Namespace) -> str:
    """The model name in rows and tables: smoke and ``--val-limit`` runs are marked, so neither can pass for a
    full-data result or match a paper row."""
    family = get_model_entry(args.model).family
    return (args.model + method_suffix(args, family, "-") + ("-smoke" if args.smoke else "")
            + (f"-val{args.val_limit}" if args.val_limit else ""))


def run_stem(args: argparse.Namespace) -> str:
    """File stem of a run's record: ``OUT/<stem>.json``."""
    subset = f"_val{args.val_limit}" if args.val_limit else ""
    bits = bit_tag(args.w_bits, args.a_bits, args.conv_act_bits)
    method = method_suffix(args, get_model_entry(args.model).family, "_")
    return f"{args.model}_{bits}{method}{'_smoke' if args.smoke else ''}{subset}"


def star_config(args: argparse.Namespace) -> FinetuneConfig | None:
    """The QwT* settings (checked now, not after the run), or None without ``--qwt-star``."""
    if not args.qwt_star:
        return None
    return FinetuneConfig(epochs=args.star_epochs, lr=args.star_lr, weight_decay=args.star_weight_decay,
                          temperature=args.star_temperature, label_weight=args.star_label_weight,
                          max_steps=args.star_max_steps)


def _check_inputs(args: argparse.Namespace) -> None:
    """Everything that can be checked without compute: device, weights file, output folders."""
    check_device(args.device)
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint)
    check_writable_dir(args.out, "--out")
    if args.save is not None:
        check_save_target(check_writable_dir(args.save, "--save"))
        save, out = Path(os.path.abspath(args.save)), Path(os.path.abspath(args.out))
        if save == out or save in out.parents:
            raise InputError(f"--save {args.save} would hold the run's records (--out {args.out}), and a save "
                             "replaces only a folder holding a previous save; pass a --save outside --out")


def run(args: argparse.Namespace, task: str) -> list[dict[str, Any]]:
    _check_inputs(args)
    entry = get_model_entry(args.model)
    ptq_cfg, qwt_cfg, star_cfg = ptq_config(args, entry.family), qwt_config(args), star_config(args)
    check_qwt_config(qwt_cfg)
    # Only rank 0 writes the record (torchrun sets RANK before the process group exists).
    writer = int(os.environ.get("RANK", "0")) == 0
    with hold_output_dir(args.out, "--out") if writer else contextlib.nullcontext():
        return _distributed_run(args, entry, ptq_cfg, qwt_cfg, star_cfg)


def _distributed_run(args: argparse.Namespace, entry: ModelEntry, ptq_cfg: PTQConfig, qwt_cfg: QwTConfig,
                     star_cfg: FinetuneConfig | None) -> list[dict[str, Any]]:
    rank, world = init_distributed(args.device)
    seed_everything(args.seed)
    pre = entry.preprocessing
    data_dir = args.data_dir
    with tempfile.TemporaryDirectory(prefix="qwt-smoke-") as tmp:
        if args.smoke:
            pre = replace(pre, size=32)
            data_dir = data_dir or write_class_folders(tmp, classes=4, train_per_class=24, val_per_class=8)
        if data_dir is None:
            raise InputError("--data-dir is required (ImageNet with train/ and val/), or use --smoke")
        loaders = make_loaders(data_dir, pre, args.calib_images, args.comp_images, args.batch_size, args.workers,
                               args.seed, args.val_limit, rank, world, None if args.smoke else 1000)
        rows = _run(args, entry, loaders, ptq_cfg, qwt_cfg, star_cfg, rank, world)
    if world > 1:
        dist.destroy_process_group()
    return rows


def _run(args: argparse.Namespace, entry: ModelEntry, loaders: QwTLoaders, ptq_cfg: PTQConfig,
         qwt_cfg: QwTConfig, star_cfg: FinetuneConfig | None, rank: int, world: int) -> list[dict[str, Any]]:
    """FP → PTQ → QwT (→ QwT*) on checked inputs; the record is rewritten after every row."""
    num_classes = len(loaders.classes)
    if loaders.counts["comp"] < args.comp_images and rank == 0:
        print(f"warning: --comp-images {args.comp_images}: only {loaders.counts['comp']} train images are used "
              "(recorded in the run's data counts)", file=sys.stderr, flush=True)
    fp = entry.build(pretrained=True, checkpoint=args.checkpoint, smoke=args.smoke,
                     num_classes=num_classes if args.smoke else 1000).to(args.device)
    check_qwt_config(qwt_cfg, compensated_blocks(entry.family.plan(fp)))
    entry.family.layer_rule(fp, ptq_cfg)  # refuses settings the family does not take, before the FP evaluation
    progress = not args.no_progress and rank == 0
    label = run_label(args)
    env = environment(args.device)
    rows: list[dict[str, Any]] = []

    def record(complete: bool = False, blocks: Sequence[BlockReport] = ()) -> None:
        if rank == 0:
            details = {"blocks": [b.to_dict() for b in blocks], "ptq": ptq_cfg.to_dict()}
            write_run(args.out, run_stem(args), rows, details, args, env, complete, loaders.counts)

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        record()

    def evaluate(model: nn.Module, desc: str) -> float:
        return _sharded_eval(model, loaders.val, args.device, world, desc, progress)

    if not args.skip_fp:
        add({"model": label, "bits": "FP", "method": "fp", "top1": evaluate(fp, "FP"), "calib_seconds": 0.0})
    comp = ((x.to(args.device), y) for x, y in loaders.comp)
    result = ptq_then_qwt(label, fp, loaders.calib.to(args.device), comp, evaluate, ptq_cfg, qwt_cfg,
                          args.batch_size, progress, on_row=add)
    if rank == 0:
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in result.phases.items())
        applied = sum(b.applied for b in result.blocks)
        r2 = [b.r2 for b in result.blocks]
        print(f"[{label}] {ptq_cfg.tag} calibration: {phases}; QwT applied to {applied}/{len(r2)} blocks, "
              f"R² {min(r2):.3f}..{max(r2):.3f}", flush=True)
    if star_cfg is not None:
        star = copy.deepcopy(result.model)
        start = time.perf_counter()
        # The batches one process would draw (a DataLoader with shuffle and drop_last), each rank taking its share;
        # augmentation seeded per image, so that it does not depend on which rank or worker loads the image.
        train_set = loaders.comp.dataset.dataset
        dataset = SeededSubset(train_set, range(len(train_set)), args.seed + 1)
        gen = torch.Generator().manual_seed(args.seed + 1)
        batches = BatchSampler(RandomSampler(dataset, generator=gen), args.batch_size, drop_last=True)
        train = DataLoader(dataset, batch_sampler=ShardedBatches(batches, rank, world), num_workers=args.workers,
                           generator=gen)
        finetune(star, fp, train, len(train), star_cfg, args.device, progress)
        add({**result.rows[-1], "method": "ptq+qwt*", "top1": evaluate(star, "PTQ+QwT*"),
             "calib_seconds": result.rows[-1]["calib_seconds"] + time.perf_counter() - start})
    if rank == 0:
        if args.save:
            save_quantized(result.model, args.save, args.model, ptq_cfg,
                           {"smoke": args.smoke, "num_classes": num_classes} if args.smoke else {})
        record(complete=True, blocks=result.blocks)
        markdown = markdown_table(rows, label)
        atomic_write(args.out / f"{run_stem(args)}.md", markdown + "\n")
        print(markdown, flush=True)
    return rows


def main(task: str, description: str, argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(task, description).parse_args(argv), task)
