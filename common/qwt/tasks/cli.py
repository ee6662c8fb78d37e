"""Command-line flags shared by every task, and their one mapping to ``PTQConfig`` / ``QwTConfig``.

Every task gets the same flags with the same meaning; only the defaults differ where the authors' code for that
task differs (detection: RepQ-ViT's original layer map, no log floor, FP32 compensation at eval), and a task
without CNNs (detection) does not offer the CNN-only flags.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..cli import check_device, finite_float, guard_fraction
from ..compensation import SOLVER_MODES, QwTConfig
from ..compensation.features import DISK
from ..family import Family
from ..ptq import PTQConfig, list_baselines
from ..ptq.baselines import make_baseline, parse_options


@dataclass(frozen=True)
class FlagDefaults:
    """The authors' settings for one task."""

    layer_map: str = "qwt"
    log_floor: float | None = 1e-6
    comp_precision: str = "fp16"
    #: the task has CNNs: offer --conv-act-bits, --kernel-size, --channels-per-group
    cnn: bool = True


CLASSIFICATION = FlagDefaults()
DETECTION = FlagDefaults(layer_map="repq_vit", log_floor=None, comp_precision="fp32", cnn=False)

#: Values of the CNN-only flags; a task without CNNs gets them as fixed defaults, so its configs are unchanged.
CNN_DEFAULTS = {"conv_act_bits": None, "kernel_size": 1, "channels_per_group": 64}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the description's own line breaks (usage examples) and shows each flag's default where
    it has one and its help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or "default" in text):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _floor(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"log floor must be ≥ 0 or 'none', got {text}")
    return value


def method_option(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` as text: the value's type is the method's to decide (:func:`parse_options`), once known."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def add_quant_flags(p: argparse.ArgumentParser, defaults: FlagDefaults) -> None:
    """PTQ and QwT flags (bits, baseline, layer map, log floor, solver, compensation precision and shape)."""
    g = p.add_argument_group("quantisation (PTQ)")
    g.add_argument("--w-bits", type=int, default=4, help="weight bits")
    g.add_argument("--a-bits", type=int, default=4, help="activation bits (16: weights only)")
    add_baseline_flags(g, None, "PTQ baseline (default: the model family's, repq_vit for ViT/DeiT/Swin, percentile "
                                "for CNNs); gptq: GPTQ-rounded weights with that default baseline's activations",
                       "for gptq: act_order=true, group_size=128, damp=0.01, symmetric=true, activations=percentile")
    g.add_argument("--layer-map", choices=["qwt", "repq_vit"], default=defaults.layer_map,
                   help="qwt: patch-embed and classifier W8A8 (the QwT authors' classification code); "
                        "repq_vit: RepQ-ViT's original map")
    g.add_argument("--log-floor", type=_floor, default=defaults.log_floor, metavar="FLOAT|none",
                   help="clamp of x/Δ before log2 in the log-√2 quantiser (the authors' classification copy: "
                        "1e-6; RepQ-ViT and their detection code: none)")
    if defaults.cnn:
        g.add_argument("--conv-act-bits", type=int, default=CNN_DEFAULTS["conv_act_bits"],
                       help="force CNN conv inputs to this width (8 reproduces the first ResNet release's 'W4/A4')")
    g = p.add_argument_group("compensation (QwT)")
    g.add_argument("--solver", choices=SOLVER_MODES, default="streaming",
                   help="streaming: FP64 statistics, Cholesky; streaming_fp32: the same with each batch's products "
                        "in FP32 (faster, results differ); reference: the authors' FP32 arithmetic, bit "
                        "for bit")
    g.add_argument("--comp-precision", choices=["fp16", "fp32"], default=defaults.comp_precision,
                   help="precision of the compensation product at evaluation")
    g.add_argument("--fp32-comp", dest="comp_precision", action="store_const", const="fp32",
                   help="same as --comp-precision fp32")
    g.add_argument("--start-block", type=int, default=0, help="blocks before this index get no compensation")
    g.add_argument("--r2-threshold", type=finite_float, default=0.0,
                   help="compensate a block only if its R² exceeds this")
    if defaults.cnn:
        g.add_argument("--kernel-size", type=int, default=CNN_DEFAULTS["kernel_size"],
                       help="grouped-conv compensation kernel (CNNs)")
        g.add_argument("--channels-per-group", "--factor", type=int, default=CNN_DEFAULTS["channels_per_group"],
                       help="input channels per group of the conv compensation (CNNs; the authors' --factor)")
    g.add_argument("--guard-fraction", type=guard_fraction, default=0.0,
                   help="held-out guard (not in the paper): hold this fraction of the compensation batches out of "
                        "each block's fit and keep a compensation only if it lowers the error there (0: off, "
                        "the authors' behaviour)")
    if not defaults.cnn:
        p.set_defaults(**CNN_DEFAULTS)
    g.add_argument("--feature-device", default=None, metavar="DEVICE|disk",
                   help="where block features wait between blocks (default: the model's device): cpu keeps GPU "
                        "memory flat in the number of compensation images, disk keeps process memory flat "
                        "(temporary files); the result is the same")


def add_baseline_flags(g: argparse._ArgumentGroup, default: str | None, method_help: str, examples: str) -> None:
    """``--method`` (every registered baseline) and ``--method-option NAME=VALUE`` (read against the chosen
    baseline's typed options by :func:`chosen_method`), as every task offers them."""
    g.add_argument("--method", choices=list_baselines(), default=default, help=method_help)
    g.add_argument("--method-option", type=method_option, action="append", default=[], metavar="NAME=VALUE",
                   help="an option of the PTQ baseline, read as the option's type (true/false, an integer, a "
                        f"number, none where allowed, or text; repeatable), e.g. {examples}")


def chosen_method(args: argparse.Namespace, family: Family) -> tuple[str, dict[str, Any]]:
    """The baseline the flags name (``--method``, else the family's default) and its typed ``--method-option``s."""
    name = args.method or family.default_baseline
    return name, parse_options(name, args.method_option)


def ptq_config(args: argparse.Namespace, family: Family) -> PTQConfig:
    """The PTQ config of the flags, resolved for ``family`` (no ``--method``: its default baseline, whose
    options ``--method-option`` then sets) and refused now (before any compute) if the method does not fit it."""
    name, options = chosen_method(args, family)
    method = make_baseline(name, options)
    return PTQConfig(baseline=method, w_bits=args.w_bits, a_bits=args.a_bits, layer_map=args.layer_map,
                     log_floor=args.log_floor, conv_act_bits=args.conv_act_bits).for_family(family)


def method_suffix(args: argparse.Namespace, family: Family, sep: str) -> str:
    """A PTQ method other than the family's default, or any option given to one, is named in labels and record
    names (``-gptq-act_order=true``), so that its rows neither overwrite another method's nor stand next to a
    paper row measured with another method."""
    name, options = chosen_method(args, family)
    if name == family.default_baseline and not options:
        return ""
    return sep + name + "".join(f"{sep}{key}={str(value).lower()}" for key, value in sorted(options.items()))


def qwt_config(args: argparse.Namespace) -> QwTConfig:
    if args.feature_device not in (None, DISK):
        check_device(args.feature_device, "--feature-device")
    return QwTConfig(start_block=args.start_block, r2_threshold=args.r2_threshold, solver=args.solver,
                     fp16_eval=args.comp_precision == "fp16", kernel_size=args.kernel_size,
                     channels_per_group=args.channels_per_group, feature_device=args.feature_device,
                     guard_fraction=args.guard_fraction)


def init_distributed(device: str) -> tuple[int, int]:
    """(rank, world size): joins the process group when run under torchrun (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), world
