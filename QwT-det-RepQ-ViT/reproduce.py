"""The paper's detection table: every detector × {W4A4, W6A6}, FP / RepQ-ViT / RepQ-ViT+QwT, next to the
published numbers in OUT/table.md (rows in OUT/*.json and OUT/summary.json).

    python QwT-det-RepQ-ViT/reproduce.py --coco-root /data/coco --checkpoints /data/det_weights [main.py flags]
    python QwT-det-RepQ-ViT/reproduce.py --smoke      # CI: reduced random-init detectors, synthetic COCO

Checkpoints are looked up as CHECKPOINTS/<model>.pth (model names as in configs/paper.json). The FP detector
is evaluated once per model (with the first bit setting). Extra flags go to main.py. Every checkpoint is looked
up before the first run; a rerun skips runs whose record is complete and made with the same flags (resume); the
table is built from those records only and lists the runs that have none.
"""
import argparse
import sys
from pathlib import Path

from qwt.cli import check_writable_dir, run_cli
from qwt.errors import InputError
from qwt.report import resume_plan
from qwt.tasks.detection.configs import MODELS
from qwt.tasks.detection.pipeline import build_parser, run, run_stem
from qwt.tasks.detection.table import write_table

HERE = Path(__file__).resolve().parent

BITS = ((4, 4), (6, 6))
SMOKE_MODELS = ("mask_rcnn_swin_t", "cascade_mask_rcnn_swin_t")
SMOKE_BITS = BITS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=Path, help="folder of <model>.pth FP detector weights")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path)
    args, extra = p.parse_known_args(argv)
    if not args.smoke and args.checkpoints is None:
        p.error("pass --checkpoints DIR and --coco-root DIR, or --smoke")
    return run_cli(_main, args, extra)


def _main(args: argparse.Namespace, extra: list[str]) -> int:
    out = check_writable_dir(args.out or Path("results/det" + ("_smoke" if args.smoke else "")), "--out")
    models, bits = (SMOKE_MODELS, SMOKE_BITS) if args.smoke else (tuple(MODELS), BITS)
    if not args.smoke:
        missing = [str(args.checkpoints / f"{m}.pth") for m in models if not (args.checkpoints / f"{m}.pth").is_file()]
        if missing:
            raise InputError(f"{len(missing)} checkpoint(s) missing: {', '.join(missing)}")
    flag_lists = []
    for model in models:
        for i, (w, a) in enumerate(bits):
            flags = ["--model", model, "--w-bits", str(w), "--a-bits", str(a), "--out", str(out), *extra]
            flags += ["--smoke", "--workers", "0", "--no-progress"] if args.smoke else [
                "--checkpoint", str(args.checkpoints / f"{model}.pth")]
            flag_lists.append(flags + (["--skip-fp"] if i else []))
    todo, stems, config = resume_plan(out, flag_lists, build_parser(__doc__).parse_args, run_stem)
    for flags, run_args in todo:
        print("+ main.py", " ".join(flags), flush=True)
        run(run_args)
    text, missing = write_table(out, stems, config, HERE / "configs" / "paper.json",
                                "QwT on COCO: Swin Mask R-CNN / Cascade Mask R-CNN")
    print(text)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
