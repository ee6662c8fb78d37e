"""Run an exported language model (:mod:`.lm`) in onnxruntime: whole windows for perplexity, and greedy
generation that carries the KV cache from call to call."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .lm import META_HEAD_DIM, META_KV_HEADS, META_LAYERS
from .writer import session


@dataclass
class Output:
    """What ``model(input_ids=...)`` returns, as far as the library's scoring reads it."""

    logits: torch.Tensor


class OnnxLM:
    """An exported decoder LM behind the call the library's scoring makes (``model(input_ids=ids).logits``), and
    greedy generation with the cache."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.session = session(path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.layers, self.kv_heads, self.head_dim = (int(meta[k]) for k in (META_LAYERS, META_KV_HEADS,
                                                                                 META_HEAD_DIM))
        except KeyError:
            raise InputError(f"{path}: not a language model written by qwt.export (no {META_LAYERS} metadata)") \
                from None
        self.outputs = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return {f"past.{i}.{kind}": empty for i in range(self.layers) for kind in ("key", "value")}

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits of ``ids`` (batch, tokens) after ``past``, and the past for the next call."""
        values = self.session.run(self.outputs, {"input_ids": ids, **past})
        present = {name.replace("present.", "past.", 1): v for name, v in zip(self.outputs[1:], values[1:])}
        return values[0], present

    def __call__(self, input_ids: torch.Tensor) -> Output:
        ids = input_ids.cpu().numpy().astype(np.int64)
        logits, _ = self.step(ids, self.empty_past(ids.shape[0]))
        return Output(torch.from_numpy(logits))

    def generate(self, prompt: list[int], tokens: int) -> list[int]:
        """``tokens`` greedy tokens after ``prompt``: the prompt in one call, then one token per call."""
        logits, past = self.step(np.asarray([prompt], dtype=np.int64), self.empty_past(1))
        out: list[int] = []
        for _ in range(tokens):
            out.append(int(logits[0, -1].argmax()))
            if len(out) == tokens:
                break
            logits, past = self.step(np.asarray([[out[-1]]], dtype=np.int64), past)
        return out


@torch.no_grad()
def torch_generate(model: torch.nn.Module, prompt: list[int], tokens: int) -> list[int]:
    """The same greedy loop in PyTorch with the model's own KV cache (the timing reference). transformers 5
    names the cache argument and output ``cache``; earlier releases ``past_key_values``."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    result: list[int] = []
    for _ in range(tokens):
        result.append(int(out.logits[0, -1].argmax()))
        if len(result) == tokens:
            break
        out = model(input_ids=torch.tensor([[result[-1]]]), use_cache=True, **{name: getattr(out, name)})
    return result
