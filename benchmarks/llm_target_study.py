"""Which fit target and options serve a language model: perplexity on held-out *calibration* windows.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/llm_target_study.py --out results/llm_target_study

SmolLM2-135M-Instruct (its wheel) on the calibration novels only: the first ``--fit-windows`` windows fit the
compensation, the next ``--heldout-windows`` score it; the evaluation novels are never read, so choosing a default
here does not tune on the numbers the README table reports. Every layer is compensated (no guard), so what is
measured is the fit itself. Settings: W4A8 with per-token activations and with static per-tensor activations (the
RTN baseline, PTQ calibrated on 4 windows as the LM task does). Variants: α of the error-propagating target, sink
rows left out, a relative ridge, and the channel-wise form; each prints a line, and the table and per-layer sink
shares go to ``OUT/study.json`` and ``OUT/study.md``, with ``OUT/sinks.png`` (each layer's share of target energy
on position 0 of the windows). ``--replot OUT`` redraws the table and chart from a saved ``study.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from qwt import QwTConfig, apply_qwt, quantize
from qwt.data.text import CALIBRATION_NOVELS, read_austen, token_windows
from qwt.environment import environment
from qwt.models.lm_loading import load_causal_lm
from qwt.tasks.llm.scoring import perplexity, perplexity_interval, score_windows
from qwt.tasks.llm.task import parse_bits
from qwt.tasks.llm.text import tokens

#: (label, QwTConfig keyword arguments) of every variant, all dense with ridge 1 unless they say otherwise.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("α=0 (authors' target)", {"propagation": 0.0}),
    ("α=0.25", {"propagation": 0.25}),
    ("α=0.5", {"propagation": 0.5}),
    ("α=0.75", {"propagation": 0.75}),
    ("α=1 (FP stream only)", {"propagation": 1.0}),
    ("α=0, sinks excluded", {"propagation": 0.0, "exclude_sinks": True}),
    ("α=0.5, sinks excluded", {"propagation": 0.5, "exclude_sinks": True}),
    ("α=0.5, relative ridge 0.01, no absolute", {"propagation": 0.5, "ridge": 0.0, "relative_ridge": 0.01}),
    ("channel-wise α=0", {"propagation": 0.0, "compensation": "channelwise"}),
    ("channel-wise α=0.5", {"propagation": 0.5, "compensation": "channelwise"}),
]
SETTINGS = {"W4A8 per-token": ("W4A8", None), "W4A8 static": ("W4A8", {"activations": "tensor"})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/llm_target_study"))
    p.add_argument("--fit-windows", type=int, default=24)
    p.add_argument("--heldout-windows", type=int, default=8)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--variants", nargs="+", type=int, help="indices into VARIANTS (default: all)")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--replot", action="store_true", help="only redraw OUT/study.md and OUT/sinks.png from OUT/study.json")
    args = p.parse_args()
    if args.replot:
        _write(args.out, json.loads((args.out / "study.json").read_text()))
        return
    torch.manual_seed(0)
    fp, tokenizer, label = load_causal_lm(None, "cpu")
    text = "\n\n".join(read_austen(CALIBRATION_NOVELS).values())
    windows = token_windows(tokens(tokenizer, text), args.window, args.fit_windows + args.heldout_windows,
                            "calibration")
    fit, held = windows[:args.fit_windows], windows[args.fit_windows:]

    def score(model: torch.nn.Module) -> tuple[float, list[float] | None]:
        s = score_windows(model, held, 4, "cpu")
        return perplexity(s), perplexity_interval(s)

    rows: list[dict[str, Any]] = [{"setting": "FP", "variant": "–", "perplexity": score(fp)[0]}]
    print(f"FP held-out calibration perplexity {rows[0]['perplexity']:.2f}", flush=True)
    chosen = [VARIANTS[i] for i in args.variants] if args.variants else VARIANTS
    for setting in args.settings:
        tag, options = SETTINGS[setting]
        ptq = quantize(copy.deepcopy(fp), fit[:4], parse_bits(tag, "rtn", options),
                       forward=lambda m, x: m(input_ids=x))
        ppl, interval = score(ptq)
        rows.append({"setting": setting, "variant": "RTN", "perplexity": ppl, "interval": interval})
        print(f"{setting} RTN {ppl:.2f}", flush=True)
        for name, kwargs in chosen:
            model = copy.deepcopy(ptq)
            start = time.perf_counter()
            config = QwTConfig(**{"fp16_eval": False, "ridge": 1.0, **kwargs})
            reports = apply_qwt(model, fit, config, batch_size=4, progress=False)
            seconds = time.perf_counter() - start
            ppl, interval = score(model)
            rows.append({"setting": setting, "variant": name, "perplexity": ppl, "interval": interval,
                         "qwt_seconds": seconds, "config": kwargs, "sinks": _sinks(reports)})
            print(f"{setting} {name}: {ppl:.2f} [{interval[0]:.2f}, {interval[1]:.2f}] ({seconds:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": label, "environment": environment(), "fit_windows": args.fit_windows,
              "heldout_windows": args.heldout_windows, "window": args.window, "rows": rows}
    (args.out / "study.json").write_text(json.dumps(result, indent=1))
    _write(args.out, result)


def _write(out: Path, result: dict[str, Any]) -> None:
    """study.md (the table) and sinks.png: per layer, the target energy's share on position 0, for the authors'
    target and each α of the dense form, one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    (out / "study.md").write_text(_table(rows))
    print(_table(rows))
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 3.6), squeeze=False, sharey=True)
    for ax, setting in zip(axes[0], settings):
        for r in rows:
            if r["setting"] == setting and r.get("sinks") and r["config"].keys() == {"propagation"}:
                ax.plot([s["position0_share"] for s in r["sinks"]], marker=".", label=r["variant"])
        ax.set(title=f"{setting}: target energy on position 0", xlabel="decoder layer", ylim=(0, 1.02))
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("share of Σ‖target‖²")
    fig.tight_layout()
    fig.savefig(out / "sinks.png", dpi=110)
    plt.close(fig)


def _sinks(reports: list) -> list[dict[str, Any]]:
    """Per layer: the dense form's sink shares, or the channel-wise form's per branch layer."""
    return [r.extra.get("sinks") or r.extra.get("sinks_per_layer") for r in reports]


def _table(rows: list[dict[str, Any]]) -> str:
    fp = rows[0]["perplexity"]
    lines = ["| setting | variant | held-out perplexity [95 %] | gap closed |", "|---|---|---|---|"]
    base = None
    for r in rows:
        if r["variant"] == "RTN":
            base = r["perplexity"]
        closed = "–" if base is None or r["variant"] in ("RTN", "–") else \
            f"{100 * (base - r['perplexity']) / (base - fp):.0f} %"
        interval = r.get("interval")
        shown = f"{r['perplexity']:.2f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")
        lines.append(f"| {r['setting']} | {r['variant']} | {shown} | {closed} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
