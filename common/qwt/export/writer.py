"""Write ONNX files and run them in onnxruntime.

Two formats. ``simulate`` traces the fake-quant model as it is: every quantiser becomes standard elementwise
ops (Div, Round, Add, Clip, Sub, Mul; Log, Pow, Where for log-√2), which express any bit width, fractional
zero points and the log-√2 grid, but compute in FP32. It computes the torch model's ops, not its bits:
onnxruntime sums MatMul/Conv products in another order, so a value on a quantiser's rounding boundary can land
one code apart, and that step travels downstream (docs/deploy.md, what runs where). ``w8a8`` traces the
model's QDQ view (see :mod:`qwt.export.w8a8`) and stores the weights as 8-bit integer initializers (INT8 on CPUs
with VNNI or AMX, UINT8 elsewhere, unless named), so onnxruntime fuses the pairs into integer kernels; the file's
metadata ``qwt.weight_dtype`` names the storage chosen. The ONNX file is a protobuf: tensors and graph only,
nothing executable, no pickle.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..compensation.channelwise import ChannelAffine, fold_channelwise
from ..compensation.modules import Compensated, compensation_precision
from ..errors import InputError
from ..quant.modules import quant_modules
from ..report import staged_file
from ._deps import require
from .w8a8 import WeightDtype, qdq_view, resolve_weight_dtype

Mode = Literal["simulate", "w8a8"]
OPSET = 17
#: ONNX metadata key naming the W8A8 weight storage of an exported file.
WEIGHT_DTYPE_KEY = "qwt.weight_dtype"
#: Nodes that mean a MatMul/Conv runs on integers in onnxruntime's optimised graph.
INTEGER_OPS = ("MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "QLinearConv", "ConvInteger",
               "QGemm", "DynamicQuantizeMatMul")
#: The largest ONNX file protobuf can serialise (2 GiB − 1 byte); a larger export is refused.
MAX_FILE_BYTES = 2**31 - 1


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, mode: Mode = "simulate",
                compensation_half: bool = False, weight_dtype: WeightDtype = "auto") -> Path:
    """Export ``model`` (quantised, maybe compensated) to ``path`` with a dynamic batch axis.

    Channel-wise compensation is folded into a copy of the model first, so it adds no node. The model's
    train/eval modes are restored afterwards (it is traced in eval mode). Every write goes to a private folder
    beside ``path`` (:func:`qwt.report.staged_file`) and the finished file is renamed into place: a failed or
    interrupted export leaves a previous file at ``path`` as it was, and nothing else behind.

    The QwT compensation runs in FP32 in the graph unless ``compensation_half``: the simulation then computes the
    same ops as the torch model with its compensation in FP32, summed in onnxruntime's order (top-1 agreement on
    vit_fmnist 99.95–100 %, not bit-identical). onnxruntime's CPU FP16 product rounds differently from torch's, so
    an FP16 simulation export warns that more predictions differ; in ``w8a8`` the
    FP32 product is also the fast one (the CPU provider has no fast FP16 GEMM). ``weight_dtype="int8"`` (w8a8)
    selects onnxruntime's faster UINT8×INT8 kernels, which saturate on x86 CPUs without VNNI, ``uint8`` kernels
    that do not (see :mod:`qwt.export.w8a8`); the default ``auto`` picks for this machine. The storage used is
    written into the file's metadata (:data:`WEIGHT_DTYPE_KEY`).
    """
    if mode not in ("simulate", "w8a8"):
        raise ValueError(f"unknown export mode {mode!r}; choose 'simulate' or 'w8a8'")
    if not example.is_floating_point():
        raise InputError(f"export_onnx traces image models (a float example batch); got {example.dtype} inputs "
                         f"for {type(model).__name__}: a language model (token ids, KV cache) is exported by "
                         "qwt.export.export_decoder_lm")
    weight_dtype = resolve_weight_dtype(weight_dtype)
    onnx = require("onnx")
    if compensation_half and mode == "simulate" and any(isinstance(m, Compensated) for m in model.modules()):
        warnings.warn("FP16 compensation in the ONNX simulation: onnxruntime rounds the FP16 product differently "
                      "from torch, so more predictions differ from the torch model than with the FP32 default",
                      UserWarning, stacklevel=2)
    if any(isinstance(m, ChannelAffine) for m in model.modules()):
        model = copy.deepcopy(model)
        fold_channelwise(model)  # into the layers' weights, scales and biases: no extra node
    path = Path(path)
    with staged_file(path) as staged:  # a failed or interrupted export leaves the previous file as it was
        _trace_in_mode(model, example, staged, mode, compensation_half, weight_dtype)
        proto = onnx.load(str(staged))  # with any external data the tracer wrote beside it (models over 2 GiB)
        if mode == "w8a8":
            _store_integer_weights(proto)
            onnx.helper.set_model_props(proto, {WEIGHT_DTYPE_KEY: weight_dtype})
        _check_size(proto, path)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(staged))
    return path


def _trace_in_mode(model: nn.Module, example: torch.Tensor, path: Path, mode: Mode, compensation_half: bool,
                   weight_dtype: WeightDtype) -> None:
    """Trace ``model`` in eval mode, as ``mode`` exports it; its train/eval modes are restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and TorchScript-exporter deprecation chatter
            with exported_view(model, mode, compensation_half, weight_dtype):
                _trace(model, example, path)
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def exported_view(model: nn.Module, mode: Mode = "simulate", compensation_half: bool = False,
                  weight_dtype: WeightDtype = "auto") -> Iterator[nn.Module]:
    """The torch model as :func:`export_onnx` traces it in ``mode`` (QDQ view for ``w8a8``; the compensation in
    FP32 unless ``compensation_half``), while inside: what a torch figure beside an export's must be computed on
    (the model's own FP16 evaluation product is another computation)."""
    if mode == "w8a8":
        with qdq_view(model, compensation_half, weight_dtype):
            yield model
    else:
        with compensation_precision(model, compensation_half):
            yield model


def _check_size(proto, path: Path) -> None:
    """Refuse a graph too large for one ONNX file (protobuf's 2 GiB limit) with one clear line, not protobuf's
    error from deep inside the checker or the writer."""
    from google.protobuf.message import EncodeError  # onnx's dependency

    try:
        too_large = proto.ByteSize() > MAX_FILE_BYTES
    except EncodeError:  # protobuf cannot even measure a message over 2 GiB
        too_large = True
    if too_large:
        weights = sum(len(t.raw_data) for t in proto.graph.initializer) / 2**30
        raise InputError(f"{path}: the exported graph (weights {weights:.2f} GiB) is larger than the 2 GiB one ONNX "
                         "file can hold, and this exporter writes a single file; export a smaller model, or one "
                         "calibrated with calibrate_w8a8 in mode 'w8a8' (8-bit weights take a quarter of the space)")


def _exp2(g, x):
    """2^x as ONNX Pow (the log-√2 quantiser's decode; the TorchScript exporter has no rule for exp2)."""
    return g.op("Pow", g.op("Constant", value_t=torch.tensor(2.0)), x)


def _clear_weight_caches(model: nn.Module) -> None:
    for _, module in quant_modules(model):
        module.clear_weight_cache()


def _trace(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Trace to ONNX. The quantised modules' fake-quantised weight caches are emptied first, so the weight
    quantisers are always traced as ops (not as whichever cached tensor a previous forward left), and after,
    so no tensor made while tracing is reused."""
    torch.onnx.register_custom_op_symbolic("aten::exp2", _exp2, OPSET)
    _clear_weight_caches(model)
    try:
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    finally:
        _clear_weight_caches(model)


def _store_integer_weights(proto) -> None:
    """Replace QuantizeLinear(FP32 constant) by the integer initializer it computes, in its zero point's type
    (ONNX rounding: half to even)."""
    numpy_helper = require("onnx").numpy_helper
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {n.output[0]: n for n in graph.node if n.op_type in ("Constant", "Identity")}

    def value(name: str) -> np.ndarray | None:
        """The constant behind ``name`` (an initializer, a Constant node, or an Identity of either)."""
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producers.get(name)
        if node is None:
            return None
        return numpy_helper.to_array(node.attribute[0].t) if node.op_type == "Constant" else value(node.input[0])

    folded = [n for n in graph.node if n.op_type == "QuantizeLinear" and value(n.input[0]) is not None]
    for node in folded:
        w, scale, zero = (value(i) for i in node.input[:3])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim == 1:
            shape[axis] = -1
        info = np.iinfo(zero.dtype)
        codes = np.rint(w / scale.reshape(shape)) + zero.reshape(shape).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(np.clip(codes, info.min, info.max).astype(zero.dtype),
                                                         node.output[0]))
        graph.node.remove(node)
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def session(path: str | Path, threads: int | None = None, optimized_path: str | Path | None = None, *,
            spin: bool = True):
    """An onnxruntime CPU session (all graph optimisations); ``optimized_path`` saves the optimised graph.

    ``spin=False`` stops idle worker threads from spinning after a run: needed when several sessions are timed in
    turn, where one session's spinning threads would otherwise take the cores from the next.
    """
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Logits of ``images`` through an onnxruntime session, batch by batch."""
    name = sess.get_inputs()[0].name
    return torch.cat([torch.from_numpy(sess.run(None, {name: x.numpy()})[0]) for x in images.split(batch_size)])


def weight_dtype_of(path: str | Path) -> str | None:
    """The W8A8 weight storage recorded in an exported file (None for a simulation export)."""
    props = {p.key: p.value for p in require("onnx").load(str(path), load_external_data=False).metadata_props}
    return props.get(WEIGHT_DTYPE_KEY)


def integer_nodes(optimized_path: str | Path) -> Counter:
    """Count the integer MatMul/Conv nodes of an optimised graph written by :func:`session`."""
    onnx = require("onnx")
    graph = onnx.load(str(optimized_path)).graph
    return Counter(n.op_type for n in graph.node if n.op_type in INTEGER_OPS)
