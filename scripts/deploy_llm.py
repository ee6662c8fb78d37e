"""Deployment of a 4-bit language model: the LM task's quantised and compensated models as ONNX files that run
in onnxruntime on CPU, with MatMulNBits 4-bit weights.

1. The LM task (``QwT-llm/main.py``) runs W4A8 with rtn's weight groups and ``activations=block`` (the 8-bit input
   blocks onnxruntime's 4-bit kernel computes with, so the simulated model is the exported one), fits the dense,
   channel-wise and reduced-rank forms, scores them in PyTorch and saves them (``--save``).
2. The rank of the reduced-rank row is chosen on held-out calibration windows: the smallest candidate whose
   held-out perplexity keeps ``--rank-share`` of the dense form's held-out gain over the baseline.
3. Each model is exported (:func:`qwt.export.export_decoder_lm`): FP32, W4, W4 + dense QwT, W4 + channel-wise QwT,
   W4 + rank-r QwT; its perplexity in onnxruntime on the task's evaluation windows is compared with the task's
   PyTorch perplexity, and a greedy continuation (onnxruntime with its KV cache against PyTorch) token by token.
4. Speed and memory, each model in its own process, same threads: ms per generated token (batch 1, a prompt of
   ``--prompt-tokens``, ``--new-tokens`` new), prefill of ``--prefill-tokens`` tokens, peak resident memory, for the
   ONNX files and the PyTorch FP32 model.

Writes ``summary.json`` (rows + environment), ``table.md`` and ``chart.png`` to ``--out``; the task's own record
and the saved models are under ``--out``/task and ``--out``/models.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import qwt  # noqa: E402
from qwt.cli import positive_int, run_cli  # noqa: E402
from qwt.compensation.blockwise import remove_compensation  # noqa: E402
from qwt.compensation.modules import Compensated  # noqa: E402
from qwt.environment import cpu_flags, environment  # noqa: E402
from qwt.errors import InputError  # noqa: E402
from qwt.export.lm import export_decoder_lm, exported_bytes  # noqa: E402
from qwt.export.lm_runtime import OnnxLM, torch_generate  # noqa: E402
from qwt.report import atomic_write, save_figure  # noqa: E402
from qwt.tasks.llm import task as llm_task  # noqa: E402
from qwt.tasks.llm.scoring import agreement, greedy_tokens, perplexity, score_windows  # noqa: E402
from qwt.tasks.llm.text import load_windows, tokens  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/deploy_llm"))
    p.add_argument("--model", default=None, help="the LM task's --model (default: smollm2)")
    p.add_argument("--smoke", action="store_true", help="a 2-layer random Llama, few short windows (CI)")
    p.add_argument("--group-size", type=int, default=32, choices=[32, 64],
                   help="input columns per 4-bit weight group (= MatMulNBits block size)")
    p.add_argument("--ranks", type=positive_int, nargs="+", default=[16, 32, 64, 128],
                   help="candidate ranks of the reduced-rank map")
    p.add_argument("--rank-share", type=float, default=0.9,
                   help="the chosen rank keeps at least this share of the dense map's held-out gain")
    p.add_argument("--window", type=positive_int, default=256)
    p.add_argument("--calib-windows", type=positive_int, default=32)
    p.add_argument("--eval-windows", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--threads", type=positive_int, default=2, help="threads of onnxruntime and torch")
    p.add_argument("--prompt-tokens", type=positive_int, default=128)
    p.add_argument("--new-tokens", type=positive_int, default=128)
    p.add_argument("--prefill-tokens", type=positive_int, default=512)
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per model (median reported)")
    p.add_argument("--continuation-tokens", type=positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-one", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)  # worker process
    args = p.parse_args(argv)
    if not 0 < args.rank_share <= 1:
        raise InputError(f"--rank-share {args.rank_share}: pass a share in (0, 1]")
    if args.smoke:
        args.window, args.calib_windows, args.eval_windows, args.batch_size = 64, 16, 8, 4
        args.ranks, args.prompt_tokens, args.new_tokens, args.prefill_tokens = [4], 16, 8, 64
        args.repeats, args.continuation_tokens = 1, 8
    return args


def task_argv(args: argparse.Namespace) -> list[str]:
    """The LM task's command line: W4A8 with the kernel's input blocks, every form, saved."""
    argv = ["--bits", "W4A8", "--method-option", f"group_size={args.group_size}", "--method-option",
            "activations=block", "--forms", "dense", "channelwise", *(f"rank{r}" for r in args.ranks),
            "--window", str(args.window), "--calib-windows", str(args.calib_windows), "--ptq-windows", "8",
            "--eval-windows", str(args.eval_windows), "--guard-fraction", "0.25", "--batch-size", str(args.batch_size),
            "--continuation-tokens", str(args.continuation_tokens), "--seed", str(args.seed), "--no-progress",
            "--out", str(args.out / "task"), "--save", str(args.out / "models")]
    if args.model:
        argv += ["--model", args.model]
    if args.smoke:
        argv += ["--tiny-random", "--ptq-windows", "4"]
    return argv


def task_record(args: argparse.Namespace) -> tuple[dict[str, Any], argparse.Namespace]:
    """The LM task's record of this deployment's run, and the task's parsed arguments."""
    parsed = llm_task.LanguageModel()
    ns = llm_task.protocol.parse_args(parsed, "", task_argv(args))
    stem = parsed.stem(ns)
    return json.loads((args.out / "task" / f"{stem}.json").read_text()), ns


def choose_rank(rows: list[dict[str, Any]], share: float) -> tuple[int, dict[str, Any]]:
    """The smallest rank whose held-out perplexity keeps ``share`` of the dense form's held-out gain over the
    baseline (the model-level guard's scores of the whole compensated model), else the best-scoring rank."""
    def held(row: dict[str, Any]) -> float:
        scores = row["output_guard"]["heldout_score_by_depth"]
        return scores[max(scores, key=float)]  # the whole model compensated

    qwt_rows = {r["form"]: r for r in rows if r["stage"] == "qwt"}
    base = qwt_rows["dense"]["output_guard"]["heldout_score"]  # the baseline's held-out perplexity
    dense_gain = base - held(qwt_rows["dense"])
    ranks = sorted(int(f[4:]) for f in qwt_rows if f.startswith("rank"))
    shares = {r: (base - held(qwt_rows[f"rank{r}"])) / dense_gain if dense_gain > 0 else 0.0 for r in ranks}
    kept = [r for r in ranks if shares[r] >= share]
    chosen = kept[0] if kept else max(ranks, key=lambda r: shares[r])
    return chosen, {"heldout_baseline": base, "heldout_dense": held(qwt_rows["dense"]),
                    "heldout_by_rank": {str(r): held(qwt_rows[f"rank{r}"]) for r in ranks},
                    "share_of_dense_gain": {str(r): shares[r] for r in ranks}, "rule_share": share, "chosen": chosen}


def variants(rank: int) -> list[tuple[str, str, str | None]]:
    """(name, the task row's stage, its form) of each exported model besides FP32."""
    return [("W4", "ptq", None), ("W4 + QwT dense", "qwt", "dense"),
            ("W4 + QwT channel-wise", "qwt", "channelwise"), (f"W4 + QwT rank {rank}", "qwt", f"rank{rank}")]


def saved_models(args: argparse.Namespace, ns: argparse.Namespace, rank: int) -> dict[str, torch.nn.Module]:
    """The task's saved models by name; the W4 baseline is the dense model with its compensation taken off (the
    same quantised layers, nothing re-quantised)."""
    task = llm_task.LanguageModel()
    (config,) = task.settings(ns)
    models = {name: qwt.load_quantized(args.out / "models" / task.save_name(ns, config, form, False))
              for name, _, form in variants(rank) if form is not None}
    base = copy.deepcopy(models["W4 + QwT dense"])
    for name, module in list(base.named_modules()):
        if isinstance(module, Compensated):
            remove_compensation(base, name)
    return {"W4": base, **models}


def parity(lm: OnnxLM, model: torch.nn.Module, windows: torch.Tensor, prompt: list[int], args: argparse.Namespace
           ) -> dict[str, Any]:
    """Perplexity of the ONNX file and of the PyTorch model on the same windows, and their greedy continuations
    (onnxruntime with its KV cache; PyTorch re-running the sequence) compared token by token."""
    onnx_scores = score_windows(lm, windows, args.batch_size, "cpu")
    torch_scores = score_windows(model, windows, args.batch_size, "cpu")
    onnx_ppl, torch_ppl = perplexity(onnx_scores), perplexity(torch_scores)
    ours = lm.generate(prompt, args.continuation_tokens)
    theirs = greedy_tokens(model, torch.tensor([prompt]), args.continuation_tokens)
    same = [a == b for a, b in zip(ours, theirs)]
    first = same.index(False) if False in same else None
    margin = None
    if first is not None:  # how close PyTorch's own choice was there: its logit for ONNX's token, below its top
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + theirs[:first]])).logits[0, -1]
        margin = float(logits[theirs[first]] - logits[ours[first]])
    return {"perplexity_onnx": onnx_ppl, "perplexity_torch": torch_ppl,
            "perplexity_ratio": onnx_ppl / torch_ppl, "top1_agreement": agreement(onnx_scores, torch_scores),
            "greedy_tokens_equal": sum(same), "greedy_first_difference": first,
            "greedy_first_difference_logit_margin": margin, "greedy_onnx": ours, "greedy_torch": theirs}


def time_one(kind: str, path: str, args: argparse.Namespace) -> dict[str, float]:
    """(worker process) ms per generated token, prefill ms, and the peak resident memory of loading and running the
    model, with the process's resident memory before it (Python, torch, onnxruntime and the library)."""
    torch.set_num_threads(args.threads)
    start_rss = reset_peak_rss()
    prompt = list(range(1000, 1000 + args.prompt_tokens))
    prefill = torch.arange(2000, 2000 + args.prefill_tokens)[None]
    if kind == "onnx":
        lm = OnnxLM(path, args.threads)
        generate, forward = lm.generate, lambda ids: lm(ids)
    else:
        model = llm_task.load_model(task_record(args)[1])[0].eval()
        generate = lambda p, n: torch_generate(model, p, n)  # noqa: E731
        forward = lambda ids: model(input_ids=ids, use_cache=False)  # noqa: E731
    generate(prompt, 4)  # warm-up: allocations, kernel selection
    decode, fill = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        generate(prompt, 1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        generate(prompt, args.new_tokens + 1)
        decode.append((time.perf_counter() - start - first) / args.new_tokens * 1000)
        start = time.perf_counter()
        with torch.no_grad():
            forward(prefill)
        fill.append((time.perf_counter() - start) * 1000)
    return {"ms_per_token": statistics.median(decode), "prefill_ms": statistics.median(fill),
            "peak_rss_mb": _status_mb("VmHWM"), "start_rss_mb": start_rss}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> float:
    """Reset the process's peak resident memory to its current one (Linux: 5 → /proc/self/clear_refs) and return
    it, so the peak read after a run is that run's (imports and arguments before it are the baseline)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def timings(paths: dict[str, Path], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each model timed in a process of its own (its peak memory is its own), one after the other."""
    out = {}
    worker = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for name, path in paths.items():
        kind = "torch" if path is None else "onnx"
        result = subprocess.run([*worker, "--time-one", kind, str(path)], env=env, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"timing {name} failed: {result.stderr.strip().splitlines()[-1:]}")
        out[name] = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"{name}: {out[name]['ms_per_token']:.1f} ms/token, prefill {out[name]['prefill_ms']:.0f} ms", flush=True)
    return out


def runtime() -> dict[str, Any]:
    """What the ONNX rows ran on: onnxruntime's version and the CPU's vector extensions that select its kernels."""
    import onnxruntime

    flags = cpu_flags() or []
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return {"onnxruntime": onnxruntime.__version__, "cpu_extensions": [f for f in wanted if f in flags]}


def slug(name: str) -> str:
    return name.lower().replace(" + ", "_").replace(" ", "_").replace("-", "")


def table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    fp = next(r for r in rows if r["model"] == "FP32")
    head = ["model", "file MB", "file / FP32", "perplexity ONNX", "PyTorch", "ONNX / PyTorch", "gap closed",
            "top-1 = PyTorch %", "greedy tokens equal", "ms / token", "speed-up vs FP32 ONNX", "prefill ms",
            "peak MB (model + run)"]
    w4 = next(r for r in rows if r["model"] == "W4")
    lines = [f"# 4-bit {summary['model']} on CPU: onnxruntime MatMulNBits with the QwT map", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"]]
        cells += ["", ""] if "file_mb" not in r else [f"{r['file_mb']:.1f}", f"{r['file_mb'] / fp['file_mb']:.1%}"]
        cells += [""] * 6 if "perplexity_onnx" not in r else [
            f"{r['perplexity_onnx']:.2f}", f"{r['perplexity_torch']:.2f}", f"{r['perplexity_ratio'] - 1:+.3%}",
            _gap(r, w4, fp), f"{r['top1_agreement']:.1f}", _greedy(r, summary['continuation_tokens'])]
        cells += [f"{r['ms_per_token']:.1f}", f"{fp['ms_per_token'] / r['ms_per_token']:.2f}×",
                  f"{r['prefill_ms']:.0f}", f"{r['peak_rss_mb'] - r['start_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    choice = summary["rank_choice"]
    lines += ["", f"Perplexity on {summary['data']['evaluation_windows']} windows of {summary['data']['window']} "
              f"tokens. W4: rtn 4-bit weights in groups of {summary['group_size']} input columns, inputs in the 4-bit "
              "kernel's own 8-bit blocks (MatMulNBits accuracy level 4), simulated in PyTorch by the same quantisers. "
              f"Rank {choice['chosen']} chosen on held-out calibration windows: the smallest rank keeping "
              f"{choice['rule_share']:.0%} of the dense map's held-out gain "
              f"({', '.join(f'rank {k}: {v:.0%}' for k, v in choice['share_of_dense_gain'].items())}). "
              f"Batch 1, prompt {summary['prompt_tokens']} tokens, {summary['new_tokens']} new; prefill "
              f"{summary['prefill_tokens']} tokens; {summary['threads']} threads, each model in its own process; "
              f"CPU {summary['environment'].get('cpu', '?')} "
              f"({', '.join(summary['environment'].get('cpu_extensions', []))})."]
    return "\n".join(lines) + "\n"


def _gap(row: dict[str, Any], w4: dict[str, Any], fp: dict[str, Any]) -> str:
    """Share of the W4 model's perplexity gap to FP that the row closes (PyTorch perplexities)."""
    if not row["model"].startswith("W4 +"):
        return ""
    base = w4["perplexity_torch"]
    return f"{(base - row['perplexity_torch']) / (base - fp['perplexity_torch']):.0%}"


def _greedy(row: dict[str, Any], tokens: int) -> str:
    first = row["greedy_first_difference"]
    if first is None:
        return f"{tokens}/{tokens}"
    return (f"{row['greedy_tokens_equal']}/{tokens} (first differs at {first}, PyTorch's logit margin there "
            f"{row['greedy_first_difference_logit_margin']:.3f})")


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = [r["model"] for r in rows]
    left.barh(names, [r["ms_per_token"] for r in rows], color="#4c72b0")
    left.set_xlabel("ms per generated token (batch 1)")
    left.invert_yaxis()
    sized = [r for r in rows if r.get("file_mb")]
    right.barh([r["model"] for r in sized], [r["file_mb"] for r in sized], color="#dd8452")
    right.set_xlabel("ONNX file (MB)")
    right.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def deploy(args: argparse.Namespace) -> int:
    if args.time_one:
        print(json.dumps(time_one(*args.time_one, args)))
        return 0
    torch.set_num_threads(args.threads)
    rc = llm_task.main("QwT on a decoder LM (for deployment)", task_argv(args))
    if rc:
        return rc
    record, ns = task_record(args)
    rank, choice = choose_rank(record["rows"], args.rank_share)
    fp, tokenizer, label = llm_task.load_model(ns)  # the task's FP model (the smoke one from the same seed)
    _, evaluation, data = load_windows(ns, tokenizer)
    prompt = tokens(tokenizer, llm_task.PROMPT).tolist()
    models = {"FP32": fp.eval(), **saved_models(args, ns, rank)}
    rows_by = {(r["stage"], r["form"]): r["perplexity"] for r in record["rows"]}
    task_ppl = {name: rows_by[(stage, form)] for name, stage, form in [("FP32", "fp", None), *variants(rank)]}
    rows, paths = [], {}
    for name, model in models.items():
        path = export_decoder_lm(model, args.out / "onnx" / f"{slug(name)}.onnx")
        paths[name] = path
        checks = parity(OnnxLM(path, args.threads), model, evaluation, prompt, args)
        checks["torch_equals_task_row"] = checks["perplexity_torch"] == task_ppl[name]
        rows.append({"model": name, "file_mb": exported_bytes(path) / 1e6, **checks})
        print(f"{name}: ONNX {checks['perplexity_onnx']:.3f} vs PyTorch {checks['perplexity_torch']:.3f}", flush=True)
    del models, fp
    times = timings({**paths, "PyTorch FP32": None}, args)
    rows.append({"model": "PyTorch FP32"})
    for row in rows:
        row.update(times[row["model"]])
    summary = {"model": label.split(" (")[0], "model_source": record["run"]["model"], "group_size": args.group_size,
               "threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
               "prefill_tokens": args.prefill_tokens, "continuation_tokens": args.continuation_tokens,
               "rank_choice": choice, "data": data, "environment": {**environment("cpu"), **runtime()},
               "task_record": str(args.out / "task"), "rows": rows}
    atomic_write(args.out / "summary.json", json.dumps(summary, indent=1) + "\n")
    text = table(rows, summary)
    atomic_write(args.out / "table.md", text)
    chart(rows, args.out / "chart.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: deploy(parse_args())))
