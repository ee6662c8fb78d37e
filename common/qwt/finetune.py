"""QwT*: brief fine-tuning of the compensation parameters and the classifier head (docs/algorithm.md#qwt-star).

The authors never released their recipe; only the trainable set is known (every compensation W/b plus the head).
Our recipe, every part of it a setting: AdamW, linear warm-up then cosine decay, distillation from the FP
model's logits (KL at temperature T, optionally mixed with cross-entropy on the labels), one epoch over the
training images through the training transform. Quantisers stay frozen; gradients pass the rounding by the
straight-through estimator. BatchNorm and dropout stay in eval mode; only the compensation runs its FP32
training path.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
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
    grad_clip: float | None = 1.0


def trainable_parameters(model: nn.Module, classifier: tuple[str, ...]) -> list[tuple[str, nn.Parameter]]:
    """Compensation weights/biases and the classifier head(s) (module paths, from the model's family);
    everything else is frozen."""
    chosen = []
    for name, param in model.named_parameters():
        is_comp = name.rsplit(".", 1)[-1] in ("comp_weight", "comp_bias")
        is_head = name.rpartition(".")[0] in classifier
        param.requires_grad_(is_comp or is_head)
        if is_comp or is_head:
            chosen.append((name, param))
    if not any(n.endswith("comp_weight") for n, _ in chosen):
        raise ValueError("no compensation parameters found: run apply_qwt before fine-tuning")
    return chosen


def finetune(model: nn.Module, teacher: nn.Module, batches: Iterable, steps_per_epoch: int,
             config: FinetuneConfig = FinetuneConfig(), device: str | torch.device = "cpu",
             progress: bool = True) -> list[float]:
    """Train the compensation and head of ``model`` against ``teacher`` (the FP model); returns the losses."""
    params = [p for _, p in trainable_parameters(model, family_of(model).classifier)]
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
                logits = model(images)
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
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
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
