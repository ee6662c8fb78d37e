"""Decoder-only language models from ``transformers`` (Llama, Qwen2, Mistral, Gemma 3, OPT, GPT-2 and others).

A model is found by its own accessors, not by attribute names: a causal LM whose decoder
(``model.get_decoder()``) holds one ModuleList of ``config.num_hidden_layers`` decoder layers (``model.layers``
for Llama, ``model.decoder.layers`` for OPT, ``transformer.h`` for GPT-2). QwT's blocks are those layers; each is
run with the arguments the model itself gives it (rotary embeddings, causal or sliding-window masks, per layer
type), recorded once per input shape by one pass through the model in which every layer is replaced by a
recorder (so nothing here depends on how a transformers release builds them). The dense compensation is
token-wise on the hidden states, ``(y + x·W) + b``; the channel-wise form corrects what each residual branch adds
to the stream (:func:`decoder_lm_residual_branches`). Every Linear of a decoder layer is quantised, GPT-2's
``Conv1D`` (a Linear with a transposed weight) converted to the equal ``nn.Linear`` first; embeddings, final norm
and the LM head stay in floating point. Mixture-of-experts layers are refused (:func:`check_supported_layers`).

``transformers`` is imported only when a model is built or recognised, so the rest of the library works without
the language-model extra. Loading checkpoints (SmolLM2, local folders, tokenizers) is :mod:`.lm_loading`'s.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from ..compensation.blockwise import BlockPlan, Step
from ..compensation.modules import Compensated
from ..errors import InputError
from ..family import Family, register_family
from ..inputs import check_token_ids
from ..ptq.config import PTQConfig
from ..ptq.surgery import LayerRule
from ..quant.modules import QuantLinear
from ..quant.quantizers import Quantizer
from ..quant.rtn import MinMaxWeightQuantizer
from .registry import ModelEntry, register_model


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList] | None:
    """(decoder, its layers) of a transformers causal LM: the decoder's single ModuleList child of
    ``config.num_hidden_layers`` entries; None for any other model."""
    if not type(model).__module__.startswith("transformers."):
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if type(model).__name__ not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return None
    decoder, count = model.get_decoder(), getattr(model.config, "num_hidden_layers", None)
    found = [c for c in decoder.children() if isinstance(c, nn.ModuleList) and len(c) == count]
    return (decoder, found[0]) if len(found) == 1 and count else None


def is_decoder_lm(model: nn.Module) -> bool:
    """A transformers causal LM whose decoder layers :func:`decoder_layers` finds."""
    return decoder_layers(model) is not None


def layers_path(model: nn.Module) -> str:
    """Where the decoder layers sit in ``model`` (``model.layers``, ``model.decoder.layers``, ``transformer.h``)."""
    layers = decoder_layers(model)[1]
    return next(name for name, module in model.named_modules() if module is layers)


def check_supported_layers(model: nn.Module) -> None:
    """Refuse a model whose decoder layers hold a weight matrix (a parameter of 2 or more dimensions) outside
    every Linear (or GPT-2 Conv1D): the layer rule quantises those only, so it would stay in floating point while
    every row says W<bits>. Mixture-of-experts layers are such (transformers keeps the experts as 3-D tensors, not
    Linear modules, and the router is no Linear either); norms (1-D) are meant to stay FP."""
    from transformers.pytorch_utils import Conv1D

    path = layers_path(model)
    layers = model.get_submodule(path)
    owners = (nn.Linear, Conv1D, Compensated)  # QwT's own map (a compensated layer) is no unquantised weight
    covered = {f"{name}.{p}" if name else p for name, module in layers.named_modules() if isinstance(module, owners)
               for p, _ in module.named_parameters(recurse=False)}
    left = [(name, tuple(p.shape)) for name, p in layers.named_parameters() if p.dim() >= 2 and name not in covered]
    if left:
        (name, shape), more = left[0], f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        raise InputError(f"{type(model).__name__}: {path}.{name} {shape}{more} is a weight of a decoder layer "
                         "outside its Linear layers, which quantisation would leave in floating point; only decoder "
                         "layers made of Linear layers and norms are supported (no mixture-of-experts)")


def linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` equal to a transformers ``Conv1D`` (``x @ W + b`` with W of shape (in, out)): the same
    outputs bit for bit, and a weight laid out (out, in) as the quantisers' per-output-channel grids expect."""
    linear = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, device=conv.weight.device,
                       dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def decoder_lm_rule(model: nn.Module, config: PTQConfig) -> LayerRule:
    """Every Linear (or Conv1D) inside a decoder layer: the baseline's weight quantiser at W bits and its
    activation quantiser at A bits (none with A16); embeddings, norms, attention matmuls and the head stay FP."""
    from transformers.pytorch_utils import Conv1D

    check_supported_layers(model)
    prefix = layers_path(model) + "."
    baseline = config.resolved_baseline()
    weight, act = baseline.weight_quantizer, baseline.activation_baseline()
    _check_weight_groups(model, weight(config.w_bits))

    def rule(name: str, module: nn.Module) -> nn.Module | None:
        if not name.startswith(prefix):
            return None
        if isinstance(module, Conv1D):
            module = linear_from_conv1d(module)
        if isinstance(module, nn.Linear):
            inputs = None if config.float_activations else act.activation_quantizer(config.a_bits)
            return QuantLinear(module, inputs, weight(config.w_bits))
        return None

    return rule


def _check_weight_groups(model: nn.Module, quantizer: Quantizer) -> None:
    """Refuse a min-max (RTN) group size that does not divide a decoder Linear's input columns now, when the rule
    is made (the LM task makes it before its FP evaluation), not when the layer is first calibrated."""
    from transformers.pytorch_utils import Conv1D

    group = getattr(quantizer, "group_size", None)
    if not isinstance(quantizer, MinMaxWeightQuantizer) or group is None:
        return
    path = layers_path(model)
    for name, module in model.get_submodule(path).named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            columns = module.weight.shape[0 if isinstance(module, Conv1D) else 1]
            if columns % group:
                raise InputError(f"group size {group} does not divide the {columns} input columns of {path}.{name}; "
                                 "pass a group size that divides every Linear's input width")


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("recorded")
        self.hidden = hidden


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during one pass: keeps what the model passes it, returns its input
    unchanged, and stops the pass after the last layer (the norm and head are not needed)."""

    def __init__(self, index: int, store: dict[int, tuple], last: bool) -> None:
        super().__init__()
        self.index, self.store, self.last = index, store, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.store[self.index] = (args, kwargs)
        if self.last:
            raise _Stop(hidden_states)
        return hidden_states


class DecoderContext:
    """The stem (token ids → embeddings) and each layer's call, with the arguments the model gives it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.decoder, self.layers = decoder_layers(model)
        self.calls: dict[tuple[int, ...], dict[int, tuple]] = {}  # input shape → layer index → (args, kwargs)

    @torch.no_grad()
    def stem(self, ids: torch.Tensor) -> torch.Tensor:
        layers = self.layers
        ids = ids.to(self.decoder.get_input_embeddings().weight.device)
        saved, store = list(layers), {}
        try:
            for i in range(len(layers)):
                layers[i] = _Recorder(i, store, i == len(layers) - 1)
            try:
                self.decoder(input_ids=ids, use_cache=False)
            except _Stop as stop:
                hidden = stop.hidden
        finally:
            for i, layer in enumerate(saved):
                layers[i] = layer
        self.calls[tuple(ids.shape)] = store
        return hidden

    def call(self, index: int):
        def run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
            args, kwargs = self.calls[tuple(x.shape[:-1])][index]
            out = layer(x, *args, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        return run


def decoder_lm_plan(model: nn.Module) -> BlockPlan:
    check_supported_layers(model)
    context = DecoderContext(model)
    path = layers_path(model)
    steps = [Step(f"{path}.{i}", call=context.call(i)) for i in range(len(context.layers))]
    return BlockPlan(stem=context.stem, steps=steps, form="linear", check_inputs=check_token_ids, sequence=True)


# -- residual branches -------------------------------------------------------------------------------------------

_PASS_THROUGH = (nn.Dropout, nn.Identity)


@torch.no_grad()
def _trace(model: nn.Module, block_path: str) -> tuple[list[str], dict[str, torch.Tensor], list[tuple[str, Any]]]:
    """One pass of two tokens through the model, stopped after the block at ``block_path``: the block's weight
    layers (Linear, Conv1D) in the order they ran, each of its modules' output, and (module, first input) in
    call order. The tensors are kept alive, so identity says which module took which module's output."""
    from transformers.pytorch_utils import Conv1D

    decoder, _ = decoder_layers(model)
    block = model.get_submodule(block_path)
    order: list[str] = []
    outputs: dict[str, torch.Tensor] = {}
    inputs: list[tuple[str, Any]] = []

    def seen_input(name: str, args: tuple, kwargs: dict) -> None:
        inputs.append((name, args[0] if args else next(iter(kwargs.values()), None)))

    def seen_output(name: str, weight: bool, out: Any) -> None:
        outputs[name] = out[0] if isinstance(out, tuple) else out
        if weight:
            order.append(name)

    def stop(module: nn.Module, args: tuple, out: Any) -> None:
        raise _Stop(out)

    hooks = [block.register_forward_hook(stop)]
    for name, module in block.named_modules():
        if name:
            weight = isinstance(module, (nn.Linear, Conv1D))
            hooks.append(module.register_forward_pre_hook(
                lambda m, a, k, name=name: seen_input(name, a, k), with_kwargs=True))
            hooks.append(module.register_forward_hook(lambda m, a, o, n=name, w=weight: seen_output(n, w, o)))
    ids = torch.zeros(1, 2, dtype=torch.long, device=decoder.get_input_embeddings().weight.device)
    try:
        decoder(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return order, outputs, inputs


def _written_by(block: nn.Module, end: str, outputs: dict[str, torch.Tensor], inputs: list[tuple[str, Any]]) -> str:
    """``end``, or the normalisation module that takes its output (past dropouts) before the residual add: a
    post-branch ("sandwich") norm such as Gemma 3's post_attention_layernorm. What the branch adds to the residual
    stream is then that norm's output, and only there is a per-channel correction one of the stream."""
    tensor = outputs[end]
    for name, x in inputs:
        if x is not tensor or name == end:
            continue
        module = block.get_submodule(name)
        if isinstance(module, _PASS_THROUGH):
            tensor = outputs[name]
        elif "norm" in type(module).__name__.lower():
            return name
    return end


def decoder_lm_residual_branches(model: nn.Module, block_path: str) -> list[str]:
    """Where each residual branch of a decoder layer ends: the last weight layer to run in the attention
    sub-module (the block's child that runs the first weight layer: ``self_attn.o_proj``, ``attn.c_proj``,
    ``self_attn.out_proj``) and the block's last weight layer to run (the MLP's: ``mlp.down_proj``,
    ``mlp.c_proj``, OPT's ``fc2``), each replaced by the post-branch norm that follows it where there is one
    (Gemma 3: ``post_attention_layernorm``, ``post_feedforward_layernorm``). Found by one pass of two tokens up
    to the block, with hooks: the order is the one the model computes, not the one its modules were declared in."""
    order, outputs, inputs = _trace(model, block_path)
    if not order:
        raise InputError(f"{block_path}: no Linear layer ran in this decoder layer; nothing to correct")
    attention = order[0].split(".")[0]
    in_attention = [name for name in order if name.split(".")[0] == attention]
    if order[-1] in in_attention:
        raise InputError(f"{block_path}: its last Linear ({order[-1]}) is in {attention}; the decoder-LM family "
                         "needs an attention sub-module followed by an MLP")
    block = model.get_submodule(block_path)
    return [_written_by(block, end, outputs, inputs) for end in (in_attention[-1], order[-1])]


DECODER_LM = register_family(Family(
    name="decoder_lm", matches=is_decoder_lm, layer_rule=decoder_lm_rule, plan=decoder_lm_plan, default_baseline="rtn",
    residual_branches=decoder_lm_residual_branches, check_inputs=check_token_ids))


# -- building ----------------------------------------------------------------------------------------------------

def config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's architecture as JSON-able build arguments (what a saved model records); loading-time settings
    (GGUF quantisation, the source path) are dropped: the saved model holds plain FP32 tensors."""
    d = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        d.pop(key, None)
    return d


def build_from_config(pretrained: bool = False, config: dict[str, Any] | None = None, **_: Any) -> nn.Module:
    """A causal LM from a config dict (random weights; a saved model's tensors fill them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if pretrained or config is None:
        raise ValueError("hf_causal_lm builds from a config dict only; load weights with qwt.models.lm_loading."
                         "load_causal_lm")
    cfg = dict(config)
    cfg_obj = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoModelForCausalLM.from_config(cfg_obj, dtype=torch.float32).eval()


#: What a family's tiny config needs beyond the shared sizes: OPT's and GPT-2's own name for the MLP width and
#: special tokens inside the 128-token vocabulary; Gemma 3's head size (256 by default) and a sliding window shorter
#: than the test windows, on one of its two layers, so local and global layers get different masks and rotary
#: embeddings.
_TINY_EXTRA: dict[str, dict[str, Any]] = {
    "opt": {"ffn_dim": 128},
    "gpt2": {"n_inner": 128, "bos_token_id": 0, "eos_token_id": 0},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention"]},
}

#: Model types a saved language model may name, with the activation its MLP uses (the key it is stored under,
#: the value) and where its decoder layers' tensors live. Tensor names alone do not pin the arithmetic (an
#: activation or a model type with the same names computes something else), so a saved config is held to these.
SAVED_MODEL_TYPES: dict[str, tuple[str, str, str]] = {
    "llama": ("hidden_act", "silu", "model.layers"),
    "mistral": ("hidden_act", "silu", "model.layers"),
    "qwen2": ("hidden_act", "silu", "model.layers"),
    "gemma3_text": ("hidden_activation", "gelu_pytorch_tanh", "model.layers"),
    "opt": ("activation_function", "relu", "model.decoder.layers"),
    "gpt2": ("activation_function", "gelu_new", "transformer.h"),
}


def check_saved_config(build_kwargs: dict[str, Any], tensors: Collection[str]) -> list[str]:
    """A saved language model's builder arguments, before anything is built (building takes time per layer):
    only ``config``, one of :data:`SAVED_MODEL_TYPES` with its activation, and exactly the decoder layers the
    saved tensors hold."""
    problems = [f"{key} may not be set: hf_causal_lm builds from config alone" for key in build_kwargs
                if key != "config"]
    config = build_kwargs.get("config")
    if not isinstance(config, dict):
        return problems + ["config must be a transformers model config (a JSON object)"]
    model_type = config.get("model_type")
    if model_type not in SAVED_MODEL_TYPES:
        return problems + [f"config.model_type={model_type!r} is not one of {', '.join(SAVED_MODEL_TYPES)}"]
    key, activation, layers_at = SAVED_MODEL_TYPES[model_type]
    if config.get(key, activation) != activation:
        problems.append(f"config.{key}={config[key]!r}: {model_type}'s MLP uses {activation!r}")
    layer_key = re.compile(rf"{re.escape(layers_at)}\.(\d+)\.")
    saved = {int(match.group(1)) for name in tensors if (match := layer_key.match(name))}
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    if not isinstance(layers, int) or isinstance(layers, bool) or saved != set(range(layers)):
        held = f"layers 0..{max(saved)}" if saved == set(range(len(saved))) and saved else f"{len(saved)} layers"
        problems.append(f"config.num_hidden_layers={layers!r}, but the saved tensors hold decoder {held}")
    return problems


def tiny_config(model_type: str = "llama", vocab_size: int = 128) -> dict[str, Any]:
    """A small random-weight config for tests and the smoke run (2 layers, hidden 64)."""
    return {"model_type": model_type, "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "tie_word_embeddings": model_type == "llama",
            **_TINY_EXTRA.get(model_type, {})}


register_model(ModelEntry("hf_causal_lm", DECODER_LM, build_from_config,
                          "a transformers decoder-only causal LM (Llama, Qwen2, Mistral, Gemma 3, OPT, GPT-2, ...), "
                          "built from its config dict",
                          reduced={"config": tiny_config()}, reduced_input=(16,),
                          reduced_batch=lambda g: torch.randint(0, 128, (8, 16), generator=g),
                          check_saved_args=check_saved_config))
