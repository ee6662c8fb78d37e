"""The main job: PTQ and PTQ+QwT on real, offline data (Fashion-MNIST) for a ViT and a pretrained CNN, on CPU.

Each model is one run of the run protocol (qwt.tasks.fashion_mnist: its record, table and chart in --out), and
the two are then put together: ``table.md``, ``summary.json`` (rows, machine, data) and ``chart.png``. The GPTQ
rows use GPTQ-rounded weights with the model's activation baseline; ``A16`` settings quantise weights only.
Flags after the ones below go to every model's run (see ``--help-run``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from qwt.cli import check_writable_dir, hold_output_dir, positive_int, run_cli  # noqa: E402
from qwt.tasks import protocol  # noqa: E402
from qwt.tasks.fashion_mnist import DEFAULT_BITS, MODELS, FashionMNIST  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/demo"), help="output folder")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--vit-bits", nargs="+", default=DEFAULT_BITS["vit_fmnist"][0],
                   help="bit settings for the ViT (W3A3: where its quantisation loss is large enough to read; A16: "
                        "weights only; W4A3 and W6A6, within noise of W4A4, left out to keep the job under 5 minutes)")
    p.add_argument("--cnn-bits", nargs="+", default=DEFAULT_BITS["efficientnet_lite0"][0],
                   help="bit settings for the CNN (A16: weights only)")
    p.add_argument("--vit-gptq-bits", nargs="*", default=DEFAULT_BITS["vit_fmnist"][1],
                   help="bit settings for the ViT with GPTQ weights (none: no GPTQ rows)")
    p.add_argument("--cnn-gptq-bits", nargs="*", default=DEFAULT_BITS["efficientnet_lite0"][1],
                   help="bit settings for the CNN with GPTQ weights (none: no GPTQ rows)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--help-run", action="store_true", help="the flags every model's run takes, and exit")
    return p.parse_known_args(argv)


def model_argv(args: argparse.Namespace, model: str, extra: list[str]) -> list[str]:
    bits, gptq = (args.vit_bits, args.vit_gptq_bits) if model == "vit_fmnist" else (args.cnn_bits, args.cnn_gptq_bits)
    return ["--model", model, "--bits", *bits, "--gptq-bits", *gptq, "--out", str(args.out), *extra]


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    if args.help_run:
        protocol.build_parser(FashionMNIST(), "one model's run of the main job").print_help()
        return 0
    return run_cli(_main, args, extra)


def _main(args: argparse.Namespace, extra: list[str]) -> int:
    task, start = FashionMNIST(), time.perf_counter()
    runs = [protocol.parse_args(task, __doc__, model_argv(args, model, extra)) for model in args.models]
    for run in runs:
        protocol.check(task, run)  # every model's flags before the first model's compute
    check_writable_dir(args.out, "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    with hold_output_dir(args.out, "--out"):
        for run in runs:
            protocol.run(task, run)
        stems = [task.stem(run) for run in runs]
        markdown = protocol.combine(args.out, stems, task.columns,
                                    "QwT main job: Fashion-MNIST, CPU ({cpu_capability} kernels), "
                                    f"{runs[0].solver} solver")
    print("\n" + markdown)
    print(f"wrote {args.out}/table.md, summary.json, chart.png; per model: <model>.json/.md/.png and details/ "
          f"({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
