"""The paper's detection table: every detector × {W4A4, W6A6}, FP / RepQ-ViT / RepQ-ViT+QwT, next to the
published numbers in OUT/table.md (rows in OUT/*.json and OUT/summary.json).

    python QwT-det-RepQ-ViT/reproduce.py --coco-root /data/coco --checkpoints /data/det_weights [main.py flags]
    python QwT-det-RepQ-ViT/reproduce.py --smoke      # CI: reduced random-init detectors, synthetic COCO

Checkpoints are looked up as CHECKPOINTS/<model>.pth (model names as in configs/paper.json). The FP detector
is evaluated once per model (with the first bit setting). Extra flags go to main.py.
"""
import argparse
import sys
from pathlib import Path

from qwt.tasks.detection.configs import MODELS
from qwt.tasks.detection.pipeline import build_parser, run
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
    out = args.out or Path("results/det" + ("_smoke" if args.smoke else ""))
    models, bits = (SMOKE_MODELS, SMOKE_BITS) if args.smoke else (tuple(MODELS), BITS)
    for model in models:
        for i, (w, a) in enumerate(bits):
            flags = ["--model", model, "--w-bits", str(w), "--a-bits", str(a), "--out", str(out), *extra]
            flags += ["--smoke", "--workers", "0", "--no-progress"] if args.smoke else [
                "--checkpoint", str(args.checkpoints / f"{model}.pth")]
            flags += ["--skip-fp"] if i else []
            print("+ main.py", " ".join(flags), flush=True)
            try:
                run(build_parser(__doc__).parse_args(flags))
            except (FileNotFoundError, ValueError) as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
    print(write_table(out, HERE / "configs" / "paper.json", "QwT on COCO: Swin Mask R-CNN / Cascade Mask R-CNN"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
