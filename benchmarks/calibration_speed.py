"""How long PTQ + QwT calibration takes, measured against one FP forward over the same images on the same device.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/calibration_speed.py --model deit_small --threads 2
    python benchmarks/calibration_speed.py --model deit_small --device cuda

Random weights and synthetic images (no data loading). Phases: the first calibration pass, RepQ-ViT
reparameterisation + re-calibration (ViTs only), GPTQ's weight rounding (``--method gptq``), QwT over every block, and for scale one FP32 forward of all the
calibration + compensation images (``fp_forward_s``: the mean of one run before and one after calibration, both
in ``fp_forward_runs_s``, since a shared machine's speed drifts), all under the same allocator setting
(``freed_memory_retained``, see qwt.allocator). ``qwt_peak_mib`` is what the QwT phase adds at its peak to the memory in use
when it starts: resident set (Linux ``VmHWM`` after resetting it) on CPU, ``torch.cuda.max_memory_allocated`` on
a GPU. ``feature_mib`` is the largest block boundary's features over all compensation images, the part that QwT
has to hold somewhere and that grows with the image count; the rest should not. The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from qwt import PTQConfig, QwTConfig, apply_qwt, create_model, get_model_entry, quantize
from qwt.allocator import freed_memory_retained, release_freed_memory
from qwt.cli import check_device, positive_int, run_cli
from qwt.compensation import SOLVER_MODES
from qwt.compensation.features import DISK
from qwt.environment import environment
from qwt.errors import InputError
from qwt.models.registry import ModelEntry
from qwt.ptq import list_baselines
from qwt.utils import PhaseTimer

_MIB = 2**20
_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M).group(1))


class PeakMemory:
    """Peak memory added by a phase: CUDA allocator statistics, or the process's resident set on Linux."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak resident set) to VmRSS
            self.base = _status_kib("VmRSS") * 1024

    def peak_mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / _MIB
        return (_status_kib("VmHWM") * 1024 - self.base) / _MIB


@torch.no_grad()
def feature_mib(plan_fn: Callable, model: torch.nn.Module, image: torch.Tensor, count: int) -> float:
    """MiB of the largest block-boundary feature tensor for ``count`` images, from one image's FP pass."""
    plan = plan_fn(model)
    x = plan.stem(image)
    largest = x.numel()
    for step in plan.steps:
        x = step.run(model.get_submodule(step.path), x)
        largest = max(largest, x.numel())
    return largest * 4 * count / _MIB


@torch.no_grad()
def fp_forward_seconds(model: torch.nn.Module, image_sets: tuple[torch.Tensor, ...], batch_size: int) -> float:
    """Seconds for one FP forward over every image, in batches, after a warm-up batch."""
    model(image_sets[0][:batch_size])
    timer = PhaseTimer()
    for images in image_sets:
        for batch in images.split(batch_size):
            model(batch)
    return timer("fp forward")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small",
                   help="an image model of the registry (its input: RGB 224×224 for ImageNet models)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--method", choices=list_baselines(), default=None,
                   help="PTQ baseline (default: the family's default_baseline, RepQ-ViT for ViTs, percentile for "
                        "CNNs)")
    p.add_argument("--calib-images", type=positive_int, default=32)
    p.add_argument("--comp-images", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--solver", choices=SOLVER_MODES, default="streaming")
    p.add_argument("--feature-device", default=None,
                   help="where QwT keeps block features between blocks: a device (e.g. cpu for a GPU run) or disk; "
                        "default: --device")
    p.add_argument("--smoke", action="store_true",
                   help="the registry's reduced variant of the model on its small images (tests)")
    p.add_argument("--fresh-pages", action="store_true",
                   help="leave glibc's allocator as it is (every large tensor faults in fresh pages) instead of "
                        "qwt.allocator.retain_freed_memory(), which the command-line tools use")
    return p.parse_args(argv)


def image_shape(entry: ModelEntry, smoke: bool) -> tuple[int, ...]:
    """One synthetic image's shape: the registry's, for its reduced variant with ``--smoke`` (whose build
    arguments differ per model: vit_fmnist is already small and takes 1×28×28 images)."""
    if entry.reduced_batch is not None:
        raise InputError(f"--model {entry.name} takes token ids, not images; this benchmark times image models "
                         "(choose another --model)")
    return entry.reduced_input if smoke else entry.input_shape


def run(args: argparse.Namespace) -> dict:
    """Time every phase and return the figures (also the JSON line :func:`main` prints). Every input is checked
    before the first timing."""
    check_device(args.device)
    if args.feature_device not in (None, DISK):
        check_device(args.feature_device, "--feature-device")
    entry = get_model_entry(args.model)
    shape = image_shape(entry, args.smoke)
    ptq_config = PTQConfig(baseline=args.method, w_bits=args.w_bits, a_bits=args.a_bits).for_family(entry.family)
    qwt_config = QwTConfig(solver=args.solver, feature_device=args.feature_device)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, pretrained=False, **(entry.reduced if args.smoke else {})).to(device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    calib = torch.randn(args.calib_images, *shape, device=device, generator=gen)
    comp = torch.randn(args.comp_images, *shape, device=device, generator=gen)
    features = feature_mib(entry.family.plan, model, comp[:1], args.comp_images)

    fp_model = copy.deepcopy(model)
    fp_runs = [fp_forward_seconds(fp_model, (calib, comp), args.batch_size)]

    timer = PhaseTimer()
    quantize(model, calib, ptq_config, on_phase=timer)
    ptq = timer.total
    memory = PeakMemory(device)
    release_freed_memory()  # the baseline is the memory in use, not what earlier phases left for reuse
    memory.start()
    timer.restart()
    apply_qwt(model, comp, qwt_config, batch_size=args.batch_size, progress=False)
    qwt_s = timer("qwt")
    total = timer.total
    # Measured again after calibration: on a shared machine the speed drifts over minutes, and the mean of a
    # measurement before and one after bounds how much of the ratio is drift.
    fp_runs.append(fp_forward_seconds(fp_model, (calib, comp), args.batch_size))
    fp_forward = sum(fp_runs) / len(fp_runs)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "model": args.model + ("-smoke" if args.smoke else ""), "device": name, "threads": torch.get_num_threads(),
        "images": args.calib_images + args.comp_images, "calib_images": args.calib_images,
        "comp_images": args.comp_images, "bits": ptq_config.tag, "method": ptq_config.baseline.name,
        "solver": args.solver,
        "feature_device": args.feature_device or args.device,
        "calibrate_s": round(timer.phases["calibrate"], 3),
        "reparameterize_s": round(timer.phases.get("reparameterize+recalibrate", 0.0), 3),
        "gptq_s": round(timer.phases.get("gptq", 0.0), 3),
        "fp_forward_s": round(fp_forward, 3), "fp_forward_runs_s": [round(r, 3) for r in fp_runs],
        "ptq_s": round(ptq, 3), "qwt_s": round(qwt_s, 3),
        "total_s": round(total, 3), "ratio_to_fp_forward": round(total / fp_forward, 2),
        "qwt_peak_mib": round(memory.peak_mib(), 1), "feature_mib": round(features, 1),
        "load_1min": round(os.getloadavg()[0], 2) if device.type == "cpu" else None,
        "freed_memory_retained": freed_memory_retained(), "environment": environment(args.device),
    }


def main(argv: list[str] | None = None) -> int:
    """Runs through :func:`qwt.cli.run_cli` (a bad input: one line, exit status 2), which also switches the
    allocator setting on (before the FP forward too: every phase runs with the same allocator) unless
    ``--fresh-pages``."""
    args = parse_args(argv)
    return run_cli(_report, args, retain_memory=not args.fresh_pages)


def _report(args: argparse.Namespace) -> None:
    figures = run(args)
    print(f"{figures['model']} {figures['bits']} {figures['method']} on {figures['device']} "
          f"({figures['threads']} threads), "
          f"{figures['calib_images']} calibration + {figures['comp_images']} compensation images")
    for key in ("calibrate_s", "reparameterize_s", "gptq_s", "qwt_s", "total_s", "fp_forward_s"):
        print(f"  {key:18s} {figures[key]:9.3f}")
    print(f"  {'QwT peak memory':18s} {figures['qwt_peak_mib']:9.1f} MiB (features {figures['feature_mib']:.1f} MiB)")
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    sys.exit(main())
