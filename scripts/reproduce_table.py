"""Run a task's whole paper table (every model × bit setting), then assemble it next to the paper's numbers.

    python scripts/reproduce_table.py vit --data-dir /data/imagenet --checkpoints /data/weights [main.py flags]
    python scripts/reproduce_table.py resnet --smoke

Checkpoints are looked up as CHECKPOINTS/<model>.{safetensors,pth,pth.tar,npz}. ``--smoke`` runs reduced
random-init models on synthetic data (CI). Extra flags go to the task's main.py.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

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


def _checkpoint(folder: Path, model: str) -> Path:
    for suffix in (".safetensors", ".pth", ".pth.tar", ".npz"):
        if (folder / f"{model}{suffix}").is_file():
            return folder / f"{model}{suffix}"
    raise SystemExit(f"error: no checkpoint {folder}/{model}.{{safetensors,pth,pth.tar,npz}}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(TABLES))
    p.add_argument("--checkpoints", type=Path, help="folder of <model>.<ext> FP weights")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path)
    args, extra = p.parse_known_args(argv)
    table = TABLES[args.task]
    models = table["smoke_models"] if args.smoke else table["models"]
    out = args.out or ROOT / (table["out"] + ("_smoke" if args.smoke else ""))
    if args.smoke:
        extra += ["--smoke", "--comp-images", "64", "--workers", "0", "--no-progress", *table["smoke_flags"]]
    elif args.checkpoints is None:
        p.error("pass --checkpoints DIR and --data-dir, or --smoke")
    for model in models:
        ckpt = ["--checkpoint", str(_checkpoint(args.checkpoints, model))] if args.checkpoints else []
        for i, (w, a) in enumerate(table["bits"]):
            # The FP model is evaluated once per model, with its first bit setting.
            cmd = [sys.executable, str(ROOT / table["main"]), "--model", model, "--w-bits", str(w), "--a-bits", str(a),
                   "--out", str(out), *ckpt, *extra, *(["--skip-fp"] if i else [])]
            print("+", " ".join(cmd), flush=True)
            if subprocess.run(cmd).returncode != 0:
                return 1
    return subprocess.run([sys.executable, str(ROOT / "scripts/assemble_table.py"), str(out),
                           str(ROOT / table["paper"]), "--title", table["title"]]).returncode


if __name__ == "__main__":
    sys.exit(main())
