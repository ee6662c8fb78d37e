"""Run a task's whole paper table (every model × bit setting), then assemble it next to the paper's numbers.

    python scripts/reproduce_table.py vit --data-dir /data/imagenet --checkpoints /data/weights [main.py flags]
    python scripts/reproduce_table.py resnet --smoke

Checkpoints are looked up as CHECKPOINTS/<model>.{safetensors,pth,pth.tar,npz}. ``--smoke`` runs reduced
random-init models on synthetic data (CI). Extra flags go to the task's main.py. Every checkpoint is looked up
before the first run; a rerun skips runs whose record is complete and made with the same flags (resume); the
table is assembled from those records only, and runs without one are listed as missing.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from assemble_table import assemble
from qwt.tasks.classification import build_parser, run_stem
from qwt.cli import check_writable_dir, run_cli
from qwt.errors import InputError
from qwt.report import resume_plan

ROOT = Path(__file__).resolve().parent.parent

TABLES = {
    "vit": {
        "main": "QwT-cls-RepQ-ViT/main.py", "paper": "QwT-cls-RepQ-ViT/configs/paper.json", "out": "results/cls_vit",
        "title": "QwT on ImageNet: ViT / DeiT / Swin",
        "models": ["deit_tiny", "deit_small", "deit_base", "deit_tiny_distilled", "deit_small_distilled",
                   "deit_base_distilled", "vit_small", "vit_base", "swin_tiny", "swin_small"],
        "bits": [(4, 4), (6, 6)],
        "smoke_models": ["vit_small", "deit_small_distilled", "swin_tiny"],
        "smoke_flags": ["--qwt-star", "--star-max-steps", "4"],
    },
    "resnet": {
        "main": "QwT-cls-ResNet/main.py", "paper": "QwT-cls-ResNet/configs/paper.json", "out": "results/cls_resnet",
        "title": "QwT on ImageNet: ResNet",
        "models": ["resnet18", "resnet50", "resnet101"],
        # W4A8 = every activation at 8 bits: what the first release computed and labelled "W4/A4".
        "bits": [(4, 4), (6, 6), (4, 8)],
        "smoke_models": ["resnet18", "resnet50"],
        "smoke_flags": [],
    },
}


def _checkpoint(folder: Path, model: str) -> Path | None:
    for suffix in (".safetensors", ".pth", ".pth.tar", ".npz"):
        if (folder / f"{model}{suffix}").is_file():
            return folder / f"{model}{suffix}"
    return None


def checkpoints(folder: Path, models: list[str]) -> dict[str, Path]:
    """Every weights file the table needs, found before the first run starts (not after hours of it)."""
    if not folder.is_dir():
        raise InputError(f"--checkpoints {folder} is not a folder")
    found = {m: _checkpoint(folder, m) for m in models}
    missing = [f"{folder}/{m}.{{safetensors,pth,pth.tar,npz}}" for m, path in found.items() if path is None]
    if missing:
        raise InputError(f"{len(missing)} checkpoint(s) missing: " + ", ".join(missing))
    return found


def run_child(cmd: list[str]) -> int:
    """Run one table entry; on SIGTERM/SIGINT stop the child too (it leaves its record marked incomplete)."""
    child = subprocess.Popen(cmd)
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(TABLES))
    p.add_argument("--checkpoints", type=Path, help="folder of <model>.<ext> FP weights")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path)
    args, extra = p.parse_known_args(argv)
    if not args.smoke and args.checkpoints is None:
        p.error("pass --checkpoints DIR and --data-dir, or --smoke")
    return run_cli(_main, args, extra)


def _main(args: argparse.Namespace, extra: list[str]) -> int:
    table = TABLES[args.task]
    models = table["smoke_models"] if args.smoke else table["models"]
    out = check_writable_dir(args.out or ROOT / (table["out"] + ("_smoke" if args.smoke else "")), "--out")
    if args.smoke:
        extra = [*extra, "--smoke", "--comp-images", "64", "--workers", "0", "--no-progress", *table["smoke_flags"]]
    weights = checkpoints(args.checkpoints, models) if args.checkpoints else {}
    flag_lists = []
    for model in models:
        ckpt = ["--checkpoint", str(weights[model])] if model in weights else []
        for i, (w, a) in enumerate(table["bits"]):
            # The FP model is evaluated once per model, with its first bit setting.
            flag_lists.append(["--model", model, "--w-bits", str(w), "--a-bits", str(a), "--out", str(out), *ckpt,
                               *extra, *(["--skip-fp"] if i else [])])
    todo, stems, config = resume_plan(out, flag_lists, build_parser(args.task, table["title"]).parse_args, run_stem)
    for flags, _ in todo:
        cmd = [sys.executable, str(ROOT / table["main"]), *flags]
        print("+", " ".join(cmd), flush=True)
        code = run_child(cmd)
        if code != 0:
            return code
    return assemble(out, stems, config, ROOT / table["paper"], table["title"])


if __name__ == "__main__":
    sys.exit(main())
