"""A decoder language model (Llama, Qwen2) as one ONNX graph with a KV cache, its 4-bit weights in
onnxruntime's ``MatMulNBits`` and QwT's compensation beside each layer.

The graph is written node by node from the model's modules (not traced), so each piece is the operator meant
for it: every Linear of a decoder layer is a ``MatMulNBits`` whose initialisers are the library's own codes and
scales (:mod:`.nbits`), or an FP32 ``MatMul`` for a model left in floating point; the dense QwT map is a
``MatMul`` + ``Add`` on the layer's input, added as the PyTorch module adds it, (y + x·W) + b; the reduced-rank
map two thin ``MatMul`` s; the channel-wise form is folded into the scales (gain) and the bias of ``o_proj`` and
``down_proj``. Embeddings, norms, rotary embeddings, attention and ``lm_head`` are FP32, as in the simulation.

Inputs: ``input_ids`` (batch, new tokens) and, per layer, ``past.{i}.key`` / ``past.{i}.value`` (batch, KV heads,
past tokens, head dim; 0 past tokens for a fresh sequence). Outputs: ``logits`` (batch, new tokens, vocabulary)
and ``present.{i}.key`` / ``present.{i}.value``, the past for the next call. Positions continue from the past's
length; there is no padding mask (batch rows of equal length, as perplexity windows and batch-1 generation).
Each MatMulNBits computes what its layer simulates: FP32 activations (``accuracy_level`` 0) for a weights-only
model (W4A16), or the kernel's own 8-bit blocks of the weight groups' columns (``accuracy_level`` 4, about 3× as
fast on CPU) for rtn's ``activations=block`` inputs (:class:`~qwt.quant.rtn.BlockQuantizer`); any other input
quantiser is refused.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..compensation.channelwise import ChannelAffine
from ..compensation.modules import Compensated, LinearCompensated, LowRankCompensated
from ..errors import InputError
from ..quant.modules import QuantModule
from ..quant.quantizers import Quantizer
from ..quant.rtn import BlockQuantizer
from ..report import staged_file
from ._deps import require
from .nbits import NBitsWeight, nbits_weight

#: The model types whose decoder layers this writer knows (pre-norm, rotary, SwiGLU MLP, grouped-query attention).
ARCHITECTURES = ("llama", "qwen2")
OPSET, MS_DOMAIN = 17, "com.microsoft"
#: The largest ONNX file protobuf can serialise; a larger graph keeps its tensors in a file beside it.
MAX_FILE_BYTES = 2**31 - 1
#: The name of that file: the ONNX file's own name + this.
EXTERNAL_SUFFIX = ".data"
#: Metadata keys of an exported language model.
META_LAYERS, META_KV_HEADS, META_HEAD_DIM, META_WEIGHTS = "qwt.layers", "qwt.kv_heads", "qwt.head_dim", "qwt.weights"


class _Graph:
    """Nodes, initialisers and unique names of the graph being written."""

    def __init__(self) -> None:
        self.onnx = require("onnx")
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value: np.ndarray | torch.Tensor, hint: str) -> str:
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        name = self.name(hint)
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, values: list[int], hint: str = "shape") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint)

    def op(self, kind: str, inputs: list[str], hint: str | None = None, outputs: int = 1, domain: str = "",
           **attrs: Any) -> Any:
        names = [self.name(hint or kind.lower()) for _ in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(kind, inputs, names, name=self.name(kind), domain=domain,
                                                     **attrs))
        return names[0] if outputs == 1 else names


def _architecture(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise InputError(f"ONNX language-model export: model type {kind!r}; written for {', '.join(ARCHITECTURES)} "
                         "decoder layers (pre-norm, rotary, SwiGLU)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise InputError(f"ONNX language-model export: activation {config.hidden_act!r}; written for silu")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
        raise InputError("ONNX language-model export: sliding-window attention is not written; export a model "
                         "with full attention")
    return config


def _norm(g: _Graph, x: str, norm: nn.Module) -> str:
    """RMSNorm, x·(mean(x²) + ε)^−½ · w, as onnxruntime's fused kernel."""
    return g.op("SimplifiedLayerNormalization", [x, g.const(norm.weight.float(), "norm_weight")], axis=-1,
                epsilon=float(norm.variance_epsilon))


@dataclass
class _Dense:
    """An unquantised Linear's weight (N, K) and bias."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def n(self) -> int:
        return self.weight.shape[0]


def _weight(layer: nn.Module, name: str) -> NBitsWeight | _Dense:
    """A Linear's weight as written: MatMulNBits initialisers for a quantised one (a channel-wise gain folded
    into its scales), else FP32; its bias with the channel-wise correction (g·bias + shift) folded in."""
    gain = shift = None
    if isinstance(layer, ChannelAffine):
        gain, shift, layer = layer.gain, layer.shift, layer.layer
    bias = None if layer.bias is None else layer.bias.detach().float()
    if bias is not None and gain is not None:
        bias = bias * gain.float()
    if shift is not None:
        bias = shift.float() if bias is None else bias + shift.float()
    if not isinstance(layer, QuantModule):
        if gain is not None:
            raise InputError(f"{name}: a channel-wise correction on an unquantised layer")
        return _Dense(layer.weight.detach().float(), bias)
    level = _accuracy_level(layer, name)
    w = nbits_weight(layer, name, gain)
    w.bias, w.accuracy_level = bias, level
    return w


def _accuracy_level(layer: nn.Module, name: str) -> int:
    """MatMulNBits's ``accuracy_level`` that computes what the layer simulates: 0 (FP32 activations) for a
    weights-only layer, 4 (int8 blocks of the weight groups) for rtn's ``activations=block`` inputs."""
    q = getattr(layer, "input_quantizer", None)
    if not isinstance(q, Quantizer) or not q.enabled:
        return 0
    groups = getattr(layer.weight_quantizer, "group_size", None)
    if isinstance(q, BlockQuantizer) and q.n_bits == 8 and q.block_size == groups:
        return 4
    raise InputError(f"{name}: its input quantiser ({q.kind}, {q.n_bits} bits) has no MatMulNBits counterpart; "
                     "export weights-only models (--bits W4A16) or the kernel's own 8-bit blocks "
                     "(--bits W4A8 --method-option activations=block)")


def _linears(g: _Graph, x: str, layers: list[nn.Module], names: list[str]) -> list[str]:
    """Linears that read the same ``x`` (q, k and v; gate and up) as one node whose output rows are theirs
    stacked, split afterwards: the same products with one pass over x (and one activation quantisation at
    accuracy level 4)."""
    parts = [_weight(layer, name) for layer, name in zip(layers, names)]
    if isinstance(parts[0], NBitsWeight):
        w = NBitsWeight.stack(parts)
        inputs = [x, g.const(w.packed, "codes"), g.const(w.scales, "scales"), g.const(w.zero_points, "zeros")]
        y = g.op("MatMulNBits", inputs, "matmul", domain=MS_DOMAIN, K=w.k, N=w.n, bits=w.bits,
                 block_size=w.block_size, accuracy_level=w.accuracy_level)
    else:
        y = g.op("MatMul", [x, g.const(torch.cat([p.weight for p in parts]).t(), "weight")])
    if any(p.bias is not None for p in parts):
        biases = [torch.zeros(p.n) if p.bias is None else p.bias for p in parts]
        y = g.op("Add", [y, g.const(torch.cat(biases), "bias")])
    if len(parts) == 1:
        return [y]
    return g.op("Split", [y, g.ints([p.n for p in parts], "split")], outputs=len(parts), axis=-1)


def _attention(g: _Graph, x: str, attn: nn.Module, config: Any, i: int, rope: tuple[str, str],
               lengths: tuple[str, str]) -> tuple[str, str, str]:
    """onnxruntime's GroupQueryAttention: rotary embeddings on queries and keys, the past keys and values
    concatenated before the new ones, causal softmax(q·kᵀ·scale)·v over them; returns (output, present key,
    present value)."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    prefix = f"layers.{i}.self_attn"
    q, k, v = _linears(g, x, [getattr(attn, f"{p}_proj") for p in "qkv"], [f"{prefix}.{p}_proj" for p in "qkv"])
    out, key, value = g.op("GroupQueryAttention", [q, k, v, f"past.{i}.key", f"past.{i}.value", *lengths, *rope],
                           outputs=3, domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads,
                           scale=float(attn.scaling), do_rotary=1, rotary_interleaved=0)
    return _linears(g, out, [attn.o_proj], [f"{prefix}.o_proj"])[0], key, value


def _mlp(g: _Graph, x: str, mlp: nn.Module, i: int) -> str:
    gate, up = _linears(g, x, [mlp.gate_proj, mlp.up_proj], [f"layers.{i}.mlp.{p}_proj" for p in ("gate", "up")])
    hidden = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    return _linears(g, hidden, [mlp.down_proj], [f"layers.{i}.mlp.down_proj"])[0]


def _compensation(g: _Graph, y: str, x: str, wrapper: nn.Module) -> str:
    """(y + c(x)) + b as the module adds it: the dense map x·W, or the reduced-rank (x·D)·U."""
    if isinstance(wrapper, LinearCompensated):
        product = g.op("MatMul", [x, g.const(wrapper.comp_weight.detach().float(), "comp_weight")])
    elif isinstance(wrapper, LowRankCompensated):
        down = g.op("MatMul", [x, g.const(wrapper.comp_down.detach().float(), "comp_down")])
        product = g.op("MatMul", [down, g.const(wrapper.comp_up.detach().float(), "comp_up")])
    else:
        raise InputError(f"{type(wrapper).__name__}: no ONNX form written for this compensation")
    if wrapper.fp16_eval:
        raise InputError("the compensation's FP16 product (fp16_eval) is not written; fit it with fp16_eval=False")
    return g.op("Add", [g.op("Add", [y, product]), g.const(wrapper.comp_bias.detach().float(), "comp_bias")])


def _layer(g: _Graph, x: str, layer: nn.Module, config: Any, i: int, rope: tuple[str, str],
           lengths: tuple[str, str]) -> tuple[str, str, str]:
    wrapper = layer if isinstance(layer, Compensated) else None
    block = layer.block if wrapper is not None else layer
    attn, key, value = _attention(g, _norm(g, x, block.input_layernorm), block.self_attn, config, i, rope,
                                  lengths)
    h = g.op("Add", [x, attn])
    out = g.op("Add", [h, _mlp(g, _norm(g, h, block.post_attention_layernorm), block.mlp, i)])
    return (out if wrapper is None else _compensation(g, out, x, wrapper)), key, value


def _positions(g: _Graph, rotary: nn.Module) -> tuple[tuple[str, str], tuple[str, str]]:
    """The rotary tables (cos, sin) of positions 0..T−1 (T = past + new tokens), computed in the graph as the
    model computes them (position·inverse frequency in FP32, then cos and sin), and GroupQueryAttention's lengths:
    each row's T − 1 and T."""
    past = g.op("Gather", [g.op("Shape", ["past.0.key"]), g.ints([2])], axis=0)
    new = g.op("Gather", [g.op("Shape", ["input_ids"]), g.ints([1])], axis=0)
    total = g.op("Add", [past, new])
    positions = g.op("Range", [g.const(np.int64(0), "zero"), g.op("Squeeze", [total, g.ints([0])]),
                               g.const(np.int64(1), "one")])
    freqs = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", [positions], to=1), g.ints([1])]),
                         g.const(rotary.inv_freq.float().reshape(1, -1), "inv_freq")])
    cos, sin = g.op("Cos", [freqs]), g.op("Sin", [freqs])
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if scaling != 1.0:
        factor = g.const(np.float32(scaling), "rope_scaling")
        cos, sin = g.op("Mul", [cos, factor]), g.op("Mul", [sin, factor])
    total32 = g.op("Cast", [total], to=6)  # int32
    batch = g.op("Gather", [g.op("Shape", ["input_ids"]), g.ints([0])], axis=0)
    last = g.op("Expand", [g.op("Sub", [total32, g.const(np.int32([1]), "one")]), batch])
    return (cos, sin), (last, g.op("Squeeze", [total32, g.ints([0])]))


def _head(g: _Graph, x: str, model: nn.Module) -> str:
    """logits = x·Eᵀ with E the head's (vocabulary, hidden) weight, stored once when tied to the embeddings."""
    flat = g.op("Reshape", [x, g.ints([-1, model.config.hidden_size])])
    weight = model.lm_head.weight
    tied = weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    name = "embed_tokens" if tied else g.const(weight.detach().float(), "lm_head")
    logits = g.op("Gemm", [flat, name], transB=1)
    batch_tokens = g.op("Shape", ["input_ids"])
    vocab = g.ints([weight.shape[0]])
    return g.op("Reshape", [logits, g.op("Concat", [batch_tokens, vocab], axis=0)])


def build_graph(model: nn.Module) -> Any:
    """The ONNX ModelProto of ``model`` (see the module docstring)."""
    onnx = require("onnx")
    config = _architecture(model)
    if getattr(model.lm_head, "bias", None) is not None:
        raise InputError("ONNX language-model export: lm_head with a bias is not written")
    g = _Graph()
    decoder = model.get_decoder()
    g.inits.append(onnx.numpy_helper.from_array(decoder.embed_tokens.weight.detach().float().numpy(), "embed_tokens"))
    rope, lengths = _positions(g, decoder.rotary_emb)
    x = g.op("Gather", ["embed_tokens", "input_ids"], axis=0)
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache_shape = ["batch", kv_heads, "past", head_dim]
    inputs = [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "tokens"])]
    outputs = []
    for i, layer in enumerate(decoder.layers):
        x, key, value = _layer(g, x, layer, config, i, rope, lengths)
        for kind, tensor in (("key", key), ("value", value)):
            inputs.append(onnx.helper.make_tensor_value_info(f"past.{i}.{kind}", onnx.TensorProto.FLOAT, cache_shape))
            g.nodes.append(onnx.helper.make_node("Identity", [tensor], [f"present.{i}.{kind}"]))
            outputs.append(onnx.helper.make_tensor_value_info(f"present.{i}.{kind}", onnx.TensorProto.FLOAT,
                                                              ["batch", kv_heads, "total", head_dim]))
    logits = _head(g, _norm(g, x, decoder.norm), model)
    g.nodes.append(onnx.helper.make_node("Identity", [logits], ["logits"]))
    outputs.insert(0, onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT,
                                                         ["batch", "tokens", config.vocab_size]))
    graph = onnx.helper.make_graph(g.nodes, "decoder_lm", inputs, outputs, g.inits)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET),
                                                         onnx.helper.make_opsetid(MS_DOMAIN, 1)])
    levels = sorted({a.i for n in g.nodes if n.op_type == "MatMulNBits" for a in n.attribute
                     if a.name == "accuracy_level"})
    weights = f"int4 MatMulNBits, accuracy_level {', '.join(map(str, levels))}" if levels else "float32"
    meta = {META_LAYERS: len(decoder.layers), META_KV_HEADS: kv_heads, META_HEAD_DIM: head_dim, META_WEIGHTS: weights}
    onnx.helper.set_model_props(proto, {k: str(v) for k, v in meta.items()})
    return proto


def export_decoder_lm(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` (FP; or rtn-quantised with weight groups, weights only or with ``activations=block``;
    maybe QwT-compensated) to ``path`` as an ONNX file, written in a private folder and renamed into place, so a
    failure leaves ``path`` as it was. A graph over protobuf's 2 GiB limit for one file (a 1.5B model, even in 4
    bits with its FP32 embeddings) keeps its tensors in ``path`` + ``.data`` beside it (ONNX external data, which
    onnxruntime reads from beside the file); that file is moved into place just before the graph."""
    onnx = require("onnx")
    path = Path(path)
    with torch.no_grad():
        proto = build_graph(model)
    external = proto.ByteSize() > MAX_FILE_BYTES
    data = path.with_name(path.name + EXTERNAL_SUFFIX)
    with staged_file(path) as staged:
        onnx.save(proto, str(staged), save_as_external_data=external, all_tensors_to_one_file=True,
                  location=data.name)
        if external:
            os.replace(staged.with_name(data.name), data)
    return path


def exported_bytes(path: str | Path) -> int:
    """The size of an exported language model: its file and, for a graph over 2 GiB, its tensor file beside it."""
    path = Path(path)
    data = path.with_name(path.name + EXTERNAL_SUFFIX)
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
