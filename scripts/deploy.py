"""Deployment counterpart of the main job: ONNX exports run in onnxruntime on CPU.

For each model: FP32, W8A8 (integer kernels), W8A8 + QwT (FP32 compensation beside each block), W8A8 +
channel-wise compensation (folded into the weights), and simulation exports of W4A4 PTQ and PTQ + QwT. Top-1
(onnxruntime, and the torch model it was exported from) where test data exists, latency at batch 1 and 32,
file size. ``vit_fmnist`` and ``efficientnet_lite0`` are the main job's models on Fashion-MNIST; DeiT-S and
ResNet-50 have random weights (latency only; their calibration images are Gaussian noise).

W8A8 weights are stored as INT8 on CPUs with VNNI or AMX and as UINT8 elsewhere, unless ``--weight-dtype`` names
one (see :mod:`qwt.export.w8a8`); the storage used and the CPU's flags are recorded with the results.

Writes ``summary.json`` (rows + environment), ``table.md`` and ``chart.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import qwt  # noqa: E402
from qwt.cli import check_writable_dir, hold_output_dir, positive_int, run_cli  # noqa: E402
from qwt.data.fashion_mnist import load_fashion_mnist, normalize  # noqa: E402
from qwt.environment import environment as run_environment, kernels_note  # noqa: E402
from qwt.export import (calibrate_w8a8, export_onnx, exported_view, integer_nodes,  # noqa: E402
                         resolve_weight_dtype, run, session)
from qwt.export.w8a8 import WEIGHT_DTYPES  # noqa: E402
from qwt.report import atomic_write, save_figure  # noqa: E402
from qwt.tasks.fashion_mnist import cnn_input, disjoint_subsets, fit_linear_probe  # noqa: E402
from qwt.utils import seed_everything  # noqa: E402


#: PTQ calibration images per model, and train images of the EfficientNet's linear probe (as the main job).
CALIB_IMAGES, PROBE_IMAGES = 32, 6000


@dataclass
class Workload:
    name: str
    entry: str
    fp: nn.Module
    calib: torch.Tensor
    comp: torch.Tensor
    test: tuple[torch.Tensor, torch.Tensor] | None
    method: str  # PTQ method of the W4A4 simulation rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/deploy"))
    p.add_argument("--models", nargs="+", default=["vit_fmnist", "efficientnet_lite0", "deit_small", "resnet50"],
                   choices=["vit_fmnist", "efficientnet_lite0", "deit_small", "resnet50"])
    p.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="onnxruntime intra-op threads")
    p.add_argument("--b1-runs", type=positive_int, default=20, help="timed runs at batch 1 (median reported)")
    p.add_argument("--b32-runs", type=positive_int, default=5, help="timed runs at batch 32 (median reported)")
    p.add_argument("--comp-images", type=positive_int, default=512, help="QwT images for the Fashion-MNIST models")
    p.add_argument("--random-comp-images", type=positive_int, default=64, help="QwT images for DeiT-S / ResNet-50")
    p.add_argument("--cnn-test-images", type=positive_int, default=2000,
                   help="EfficientNet test subset, as the main job")
    p.add_argument("--weight-dtype", choices=["auto", *WEIGHT_DTYPES], default="auto",
                   help="how W8A8 exports store weights: int8 runs onnxruntime's fast UINT8×INT8 kernels (exact with "
                        "VNNI/AMX, saturating on x86 CPUs without), uint8 its UINT8×UINT8 ones (exact on any CPU, "
                        "slower); auto (default): int8 if this CPU has VNNI or AMX, else uint8")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.weight_dtype = resolve_weight_dtype(args.weight_dtype)  # recorded as what ran, never "auto"
    return args


def workloads(args: argparse.Namespace) -> list[Workload]:
    out = []
    needs_fmnist = {"vit_fmnist", "efficientnet_lite0"} & set(args.models)
    if needs_fmnist:
        train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    if "vit_fmnist" in args.models:
        calib, comp = disjoint_subsets(len(train[0]), (CALIB_IMAGES, args.comp_images), args.seed)
        out.append(Workload("vit_fmnist", "vit_fmnist", qwt.create_model("vit_fmnist"), normalize(train[0][calib]),
                            normalize(train[0][comp]), (normalize(test[0]), test[1]), "repq_vit"))
    if "efficientnet_lite0" in args.models:
        probe, calib, comp = disjoint_subsets(len(train[0]), (PROBE_IMAGES, CALIB_IMAGES, args.comp_images),
                                              args.seed + 1)
        fp = qwt.create_model("efficientnet_lite0", num_classes=10)
        fp.classifier = fit_linear_probe(fp, cnn_input(train[0][probe], 64), train[1][probe], 250)
        n = min(args.cnn_test_images, len(test[0]))
        subset = f"-test{n}" if n < len(test[0]) else ""  # as the main job labels its subset
        out.append(Workload(f"efficientnet_lite0@64px{subset}", "efficientnet_lite0", fp,
                            cnn_input(train[0][calib], 64),
                            cnn_input(train[0][comp], 64), (cnn_input(test[0][:n], 64), test[1][:n]), "percentile"))
    noise = torch.Generator().manual_seed(args.seed)
    for name, method in (("deit_small", "repq_vit"), ("resnet50", "percentile")):
        if name in args.models:
            torch.manual_seed(args.seed)
            images = torch.randn(CALIB_IMAGES + args.random_comp_images, 3, 224, 224, generator=noise)
            out.append(Workload(f"{name} (random weights)", name, qwt.create_model(name, pretrained=False),
                                images[:CALIB_IMAGES], images[CALIB_IMAGES:], None, method))
    return out


def variants(work: Workload) -> list[tuple[str, str, str, nn.Module]]:
    """(format, compensation, export mode, model) for every row of one workload."""
    w8a8 = calibrate_w8a8(work.fp, work.calib)
    dense = copy.deepcopy(w8a8)
    qwt.apply_qwt(dense, work.comp, qwt.QwTConfig(fp16_eval=False), progress=False)
    channelwise = copy.deepcopy(w8a8)
    qwt.apply_qwt(channelwise, work.comp, qwt.QwTConfig(compensation="channelwise"), progress=False)
    w4a4 = copy.deepcopy(work.fp)
    qwt.quantize(w4a4, work.calib, qwt.PTQConfig(baseline=work.method, w_bits=4, a_bits=4))
    w4a4_qwt = copy.deepcopy(w4a4)
    qwt.apply_qwt(w4a4_qwt, work.comp, qwt.QwTConfig(), progress=False)
    return [("FP32", "none", "simulate", work.fp), ("W8A8", "none", "w8a8", w8a8),
            ("W8A8", "QwT (dense)", "w8a8", dense), ("W8A8", "channel-wise", "w8a8", channelwise),
            ("W4A4 sim", "none", "simulate", w4a4), ("W4A4 sim", "QwT (dense)", "simulate", w4a4_qwt)]


def latency_ms(sessions: list, example: torch.Tensor, batch: int, runs: int) -> list[float]:
    """Median latency (ms) of each session at ``batch``, timed round-robin: run r of every session before run r+1
    of any, so a drift of the machine's speed (frequent on shared machines) hits every format of a model alike."""
    x = example[:1].expand(batch, *example.shape[1:]).contiguous().numpy()
    feeds = [{sess.get_inputs()[0].name: x} for sess in sessions]
    for sess, feed in zip(sessions, feeds):
        sess.run(None, feed)  # warm-up (allocations, kernel selection)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for sess, feed, samples in zip(sessions, feeds, times):
            start = time.perf_counter()
            sess.run(None, feed)
            samples.append(time.perf_counter() - start)
    return [1000.0 * statistics.median(samples) for samples in times]


@torch.no_grad()
def torch_top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    logits = torch.cat([model(x) for x in images.split(250)])
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def measure(args: argparse.Namespace, work: Workload, folder: Path) -> list[dict]:
    rows, sessions = [], []
    for fmt, comp, mode, model in variants(work):
        path = folder / f"{work.entry}_{fmt}_{comp}.onnx".replace(" ", "_").replace("(", "").replace(")", "")
        export_onnx(model, work.calib[:1], path, mode=mode, weight_dtype=args.weight_dtype)
        optimized = path.with_suffix(".opt.onnx")
        sess = session(path, args.threads, optimized, spin=False)  # timed in turn with the other formats
        row = {"model": work.name, "format": fmt, "compensation": comp, "export": mode,
               "weight_dtype": args.weight_dtype if mode == "w8a8" else None,
               "size_mb": path.stat().st_size / 1e6, "integer_nodes": sum(integer_nodes(optimized).values()),
               "calib_images": len(work.calib), "comp_images": len(work.comp),
               "test_images": None if work.test is None else len(work.test[1])}
        if work.test is not None:
            images, labels = work.test
            row["top1"] = 100.0 * (run(sess, images).argmax(1) == labels).float().mean().item()
            with exported_view(model, mode, weight_dtype=args.weight_dtype):  # what the file computes, in torch
                row["top1_torch"] = torch_top1(model, images, labels)
        else:
            row["top1"] = row["top1_torch"] = None
        rows.append(row)
        sessions.append(sess)
    for batch, runs in ((1, args.b1_runs), (32, args.b32_runs)):
        for row, ms in zip(rows, latency_ms(sessions, work.calib, batch, runs)):
            row[f"latency_ms_b{batch}"] = ms
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def environment(args: argparse.Namespace) -> dict:
    """The run's environment (qwt.environment, with the CPU flags that decide onnxruntime's integer kernels)
    plus onnxruntime's settings."""
    import onnx
    import onnxruntime

    return {**run_environment("cpu"), "cpu_count": os.cpu_count(), "ort_threads": args.threads,
            "w8a8_weight_dtype": args.weight_dtype, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "platform": platform.platform()}


def _cell(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict], env: dict) -> str:
    """The table, with a footnote naming the machine, its kernels and the W8A8 weight storage."""
    lines = ["| model | format | compensation | top1 | top1 (torch) | latency_ms_b1 | latency_ms_b32 | size_mb |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['format']} | {r['compensation']} | {_cell(r['top1'])} | "
                     f"{_cell(r['top1_torch'])} | {_cell(r['latency_ms_b1'])} | {_cell(r['latency_ms_b32'], 0)} | "
                     f"{_cell(r['size_mb'], 3)} |")
    lines += ["", f"onnxruntime {env['onnxruntime']} on {env['cpu']}, {env['ort_threads']} threads; W8A8 weights "
                  f"{env['w8a8_weight_dtype']}; {kernels_note(env)}."]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    """Accuracy against latency, one panel per model with test data (random-weight models have none)."""
    models = list(dict.fromkeys(r["model"] for r in rows if r["top1"] is not None))
    if not models:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in (r for r in rows if r["model"] == model):
            label = f"{r['format']} {'' if r['compensation'] == 'none' else '+ ' + r['compensation']}"
            ax.scatter(r["latency_ms_b32"], r["top1"], s=40)
            ax.annotate(label, (r["latency_ms_b32"], r["top1"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("onnxruntime CPU latency, batch 32 (ms, log)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def settings(args: argparse.Namespace) -> dict:
    """What the whole run used besides each row's image counts: the models, timed runs per latency, the seed."""
    return {"models": args.models, "b1_runs": args.b1_runs, "b32_runs": args.b32_runs, "seed": args.seed,
            **({"probe_images": PROBE_IMAGES} if "efficientnet_lite0" in args.models else {})}


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    check_writable_dir(args.out, "--out")
    with hold_output_dir(args.out, "--out"):  # a second deploy run on the same --out is refused
        return _deploy(args)


def _deploy(args: argparse.Namespace) -> int:
    seed_everything(args.seed)
    start, load_start = time.perf_counter(), os.getloadavg()
    works = workloads(args)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for work in works:
            rows.extend(measure(args, work, Path(tmp)))
    env = environment(args)
    env["load_average_start"], env["load_average_end"] = load_start, os.getloadavg()
    env["seconds"] = time.perf_counter() - start
    summary = {"environment": env, "settings": settings(args), "rows": rows}
    atomic_write(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    table = markdown(rows, env)
    atomic_write(args.out / "table.md", table)
    chart(rows, args.out / "chart.png")
    print("\n" + table)
    print(f"environment: {json.dumps(env)}")
    print(f"wrote {args.out}/summary.json, table.md, chart.png ({env['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
