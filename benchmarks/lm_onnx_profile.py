"""Where a generated token's time goes in an exported language model: onnxruntime's profiler over decode steps.

Runs a prompt of ``--prompt-tokens``, then profiles ``--steps`` single-token steps with the KV cache and prints,
per operator type, the kernel time per token and its share (the profiler's own overhead makes the total above an
unprofiled run's; the shares are what to read).

    python3 benchmarks/lm_onnx_profile.py results/deploy_llm/onnx/fp32.onnx results/deploy_llm/onnx/w4.onnx
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from qwt.export.lm_runtime import OnnxLM  # noqa: E402


def profile(path: Path, threads: int, prompt_tokens: int, steps: int) -> dict[str, float]:
    """Kernel ms per decode step, by operator type."""
    lm = OnnxLM(path, threads)
    _, past = lm.step(np.arange(1000, 1000 + prompt_tokens)[None], lm.empty_past(1))
    options = ort.SessionOptions()
    options.enable_profiling, options.intra_op_num_threads = True, threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = str(Path(folder) / "profile")
        lm.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(steps):
            _, past = lm.step(np.asarray([[1234]]), past)
        events = json.loads(Path(lm.session.end_profiling()).read_text())
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1000 / steps
    return dict(totals)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    for path in args.files:
        ops = profile(path, args.threads, args.prompt_tokens, args.steps)
        total = sum(ops.values())
        print(f"{path}: {total:.2f} ms of kernels per token ({args.threads} threads)")
        for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:8]:
            print(f"  {op:32s} {ms:6.2f} ms  {ms / total:5.1%}")


if __name__ == "__main__":
    main()
