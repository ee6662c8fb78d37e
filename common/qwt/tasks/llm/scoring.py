"""How a language model is scored: held-out perplexity with a 95 % interval, next-token agreement with the FP
model, and a greedy continuation a reader can judge. Under torch.distributed each rank scores its share of the
windows and the sums are all-reduced.

The interval treats the evaluation windows as independent draws from the text: the per-window mean negative
log-likelihoods m_w have a mean m̄ (log-perplexity) and a standard error s/√n, and exp(m̄ ± 1.96·s/√n) is the
interval. It says how much a perplexity would move on other windows of the same text; two rows scored on the same
windows are correlated, so their difference is usually known better than the two intervals suggest."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: list[float]) -> list[float]:
    if _rank_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


@dataclass
class Scores:
    """Sums over this rank's windows: negative log-likelihood (nats), predicted tokens, each predicted position's
    top-1 token (for the agreement with the FP model), and each window's mean NLL per token (for the interval)."""

    nll: float
    tokens: int
    top1: torch.Tensor
    window_nll: torch.Tensor


@torch.no_grad()
def score_windows(model: nn.Module, windows: torch.Tensor, batch_size: int, device: str,
                  progress: bool = False, desc: str = "eval", shard: bool = True) -> Scores:
    """Each window of S tokens is scored on its last S − 1 (token t predicted from tokens < t of the same
    window: non-overlapping windows, no context carried across). Under torch.distributed each rank scores
    windows rank, rank + world, … (``shard=False``: ``windows`` are already this rank's own)."""
    rank, world = _rank_world()
    mine = windows[rank::world] if shard else windows
    nll, tokens, top1, per_window = 0.0, 0, [], []
    for batch in tqdm(mine.split(batch_size), desc=desc, disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        labels = batch[:, 1:]
        flat, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        nll += float(F.cross_entropy(flat, targets, reduction="sum"))
        per_window.append(F.cross_entropy(flat, targets, reduction="none").reshape(labels.shape).double().mean(-1).cpu())
        tokens += labels.numel()
        top1.append(logits.argmax(-1).cpu())
    return Scores(nll, tokens, torch.cat(top1) if top1 else torch.empty(0, windows.shape[1] - 1, dtype=torch.long),
                  torch.cat(per_window) if per_window else torch.empty(0, dtype=torch.float64))


def perplexity(scores: Scores) -> float:
    nll, tokens = all_sum([scores.nll, float(scores.tokens)])
    return math.exp(nll / tokens)


def perplexity_interval(scores: Scores, z: float = 1.96) -> list[float] | None:
    """[low, high]: exp(m̄ ∓ z·s/√n) over the per-window mean NLLs of all ranks' windows (equal lengths); None
    with fewer than two windows."""
    m = scores.window_nll
    n, total, squares = all_sum([float(m.numel()), float(m.sum()), float(m.square().sum())])
    if n < 2:
        return None
    mean = total / n
    spread = z * math.sqrt(max(squares / n - mean * mean, 0.0) * n / (n - 1) / n)
    return [math.exp(mean - spread), math.exp(mean + spread)]


def agreement(scores: Scores, reference: Scores) -> float:
    """Percent of predicted positions whose top-1 token equals the reference model's."""
    same, total = all_sum([float((scores.top1 == reference.top1).sum()), float(reference.top1.numel())])
    return 100.0 * same / total


@torch.no_grad()
def greedy_tokens(model: nn.Module, prompt: torch.Tensor, tokens: int) -> list[int]:
    """``tokens`` greedy token ids after the ids ``prompt`` (1, n): the whole sequence re-run each step, so there
    is no cache to keep right."""
    ids = prompt
    for _ in range(tokens):
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def greedy_continuation(model: nn.Module, tokenizer: Any, prompt: str, tokens: int, device: str) -> str:
    """``tokens`` greedy tokens after the text ``prompt``, as text (:func:`greedy_tokens`)."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids], device=device)
    return tokenizer.decode(greedy_tokens(model, ids, tokens))
