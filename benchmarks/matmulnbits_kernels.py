"""Where a 4-bit token's time goes: onnxruntime's MatMulNBits against an FP32 MatMul at batch 1.

A chain of ``--layers`` random K×N layers (enough weight bytes to leave the caches, as a decoder's layers do) is
run one token at a time: FP32 MatMul, and MatMulNBits at accuracy level 0 (FP32 activations: the kernel
dequantises each weight block) and 4 (activations quantised to int8 per block, integer dot products), for block
sizes 32, 64 and 128. Prints ms per pass and the weight bytes streamed per second.

    python3 benchmarks/matmulnbits_kernels.py --threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402


def chain(k: int, n: int, layers: int, block: int | None, level: int, rng: np.random.Generator) -> bytes:
    """``layers`` square layers in sequence (K = N); ``block`` None: FP32 MatMul."""
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        if block is None:
            inits.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        else:
            codes = rng.integers(0, 16, (n, k // block, block), dtype=np.uint8)
            zeros = rng.integers(0, 16, (n, k // block), dtype=np.uint8)
            inits += [numpy_helper.from_array(codes[..., 0::2] | (codes[..., 1::2] << 4), f"b{i}"),
                      numpy_helper.from_array((rng.random(n * k // block) * 1e-3).astype(np.float32), f"s{i}"),
                      numpy_helper.from_array((zeros[:, 0::2] | (zeros[:, 1::2] << 4)).reshape(-1), f"z{i}")]
            nodes.append(helper.make_node("MatMulNBits", [x, f"b{i}", f"s{i}", f"z{i}"], [f"y{i}"],
                                          domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                                          accuracy_level=level))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1536)
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=30)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    x = {"x": rng.standard_normal((1, args.width), dtype=np.float32)}
    cases = [("FP32 MatMul", None, 0)] + [(f"MatMulNBits block {b}, level {lv}", b, lv)
                                          for b in (32, 64, 128) for lv in (0, 4)]
    print(f"{args.layers} layers of {args.width}×{args.width}, batch 1, {args.threads} threads, onnxruntime "
          f"{ort.__version__}")
    for name, block, level in cases:
        sess = ort.InferenceSession(chain(args.width, args.width, args.layers, block, level, rng), options,
                                    providers=["CPUExecutionProvider"])
        for _ in range(3):
            sess.run(None, x)
        samples = []
        for _ in range(args.runs):
            start = time.perf_counter()
            sess.run(None, x)
            samples.append(time.perf_counter() - start)
        ms = 1000 * statistics.median(samples)
        mb = args.layers * args.width ** 2 * (4 if block is None else 0.5 + 4.5 / block) / 1e6
        print(f"{name:32s} {ms:7.2f} ms  {mb:6.0f} MB of weights  {mb / ms:5.1f} GB/s")


if __name__ == "__main__":
    main()
