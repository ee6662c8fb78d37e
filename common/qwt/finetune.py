"""QwT*: brief fine-tuning of the compensation parameters and the classifier head (docs/algorithm.md#qwt-star).

The authors never released their recipe; only the trainable set is known (every compensation W/b plus the head).
Our recipe, every part of it a setting: AdamW, linear warm-up then cosine decay, distillation from the FP
model's logits (KL at temperature T, optionally mixed with cross-entropy on the labels), one epoch over the
training images through the training transform. Quantisers stay frozen; gradients pass the rounding by the
straight-through estimator. BatchNorm and dropout stay in eval mode; only the compensation runs its FP32
training path.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, Sampler
from tqdm.auto import tqdm

from .compensation.modules import Compensated
from .family import family_of
from .utils import warmup_cosine


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    temperature: float = 1.0
    label_weight: float = 0.0  # 0 = pure distillation; 1 = pure cross-entropy
    max_steps: int | None = None
    grad_clip: float | None = 1.0  # None or 0: no clipping

    def __post_init__(self) -> None:
        # Each of these would train on silently (a negative loss weight, a flipped gradient) or fail after the run.
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0 (it divides the logits), got {self.temperature!r}")
        if not 0 <= self.label_weight <= 1:
            raise ValueError(f"label_weight must be in [0, 1] (0: pure distillation, 1: pure cross-entropy), "
                             f"got {self.label_weight!r}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"grad_clip must be ≥ 0 (or None: no clipping), got {self.grad_clip!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be ≥ 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {self.warmup_fraction!r}")
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError(f"epochs and max_steps must be ≥ 1, got {self.epochs} and {self.max_steps}")


def trainable_parameters(model: nn.Module, classifier: tuple[str, ...]) -> list[tuple[str, nn.Parameter]]:
    """Compensation weights/biases and the classifier head(s) (module paths, from the model's family);
    everything else is frozen."""
    comp = {id(p) for m in model.modules() if isinstance(m, Compensated) for p in m.parameters(recurse=False)}
    chosen = []
    for name, param in model.named_parameters():
        is_comp = id(param) in comp  # a wrapper's own parameters: its map (dense or two factors) and bias
        is_head = name.rpartition(".")[0] in classifier
        param.requires_grad_(is_comp or is_head)
        if is_comp or is_head:
            chosen.append((name, param))
    if not comp:
        raise ValueError("no compensation parameters found: run apply_qwt before fine-tuning")
    return chosen


class ShardedBatches(Sampler[list[int]]):
    """This rank's contiguous share of every global batch of ``batches``.

    Data-parallel QwT* then trains on the global batches one process would draw (same shuffle, same drop_last):
    with the gradients averaged by DistributedDataParallel, N ranks take the single-process steps.
    """

    def __init__(self, batches: BatchSampler, rank: int, world_size: int) -> None:
        if batches.batch_size % world_size:
            raise ValueError(f"batch size {batches.batch_size} must be a multiple of the {world_size} ranks")
        self.batches, self.rank, self.share = batches, rank, batches.batch_size // world_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch[self.rank * self.share:(self.rank + 1) * self.share]

    def __len__(self) -> int:
        return len(self.batches)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def finetune(model: nn.Module, teacher: nn.Module, batches: Iterable, steps_per_epoch: int,
             config: FinetuneConfig = FinetuneConfig(), device: str | torch.device = "cpu",
             progress: bool = True) -> list[float]:
    """Train the compensation and head of ``model`` against ``teacher`` (the FP model); returns the losses.

    Under torch.distributed the step is data-parallel: ``batches`` must give each rank its share of the global
    batch (:class:`ShardedBatches`); gradients are averaged over ranks, and the losses returned are the
    global-batch means, as one process with the whole batch would report them.
    """
    params = [p for _, p in trainable_parameters(model, family_of(model).classifier)]
    world = _world_size()
    device = torch.device(device)
    # Only the trainable parameters take part; quantiser buffers are identical on every rank already.
    student = model if world == 1 else DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warmup = max(1, int(config.warmup_fraction * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup))
    model.eval()
    teacher.eval()
    comps = [m for m in model.modules() if isinstance(m, Compensated)]
    for m in comps:
        m.training = True  # FP32 compensation path; the wrapped block stays in eval mode
    losses: list[float] = []
    t = config.temperature
    bar = tqdm(total=total, desc="QwT* fine-tune", disable=not progress, leave=False)
    try:
        while len(losses) < total:
            before = len(losses)
            for images, labels in batches:
                images, labels = images.to(device), labels.to(device)
                with torch.no_grad():
                    soft = F.softmax(teacher(images) / t, dim=-1)
                logits = student(images)
                kd = F.kl_div(F.log_softmax(logits / t, dim=-1), soft, reduction="batchmean") * t * t
                loss = (1 - config.label_weight) * kd + config.label_weight * F.cross_entropy(logits, labels)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"QwT* loss became {loss.item()} at step {len(losses)}; lower --star-lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                sched.step()
                loss = loss.detach()
                if world > 1:
                    dist.all_reduce(loss)
                    loss /= world
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if len(losses) >= total:
                    break
            if len(losses) == before:
                raise ValueError("QwT* got no training batches")
    finally:
        bar.close()
        for m in comps:
            m.training = False
        for p in model.parameters():
            p.requires_grad_(False)
    return losses
