"""Top-1 accuracy with a progress bar."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def top1_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int | None = None,
                  device: str | torch.device = "cpu", desc: str = "eval", progress: bool = True) -> float:
    """Top-1 in percent over (images, labels) batches; distilled DeiTs already average their heads in eval."""
    model.eval()
    correct = seen = 0
    for images, labels in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
        logits = model(images.to(device))
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
        seen += labels.numel()
    if seen == 0:
        raise ValueError("evaluation set is empty")
    return 100.0 * correct / seen


def tensor_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(images.split(batch_size), labels.split(batch_size)))
