"""Which layers of a block write into its residual add(s): the targets of channel-wise compensation and of the
output quantisers that let a deployed CNN's last conv run as an integer kernel."""
from __future__ import annotations

from torch import nn


def residual_output_layers(block: nn.Module) -> list[str]:
    """Names, relative to ``block``, of the last Linear/Conv of each residual branch.

    Transformer blocks (timm ViT/DeiT/Swin): ``attn.proj`` and ``mlp.fc2``. CNN blocks (torchvision ResNet,
    timm inverted-residual / depthwise-separable): the last Conv2d outside the shortcut (``downsample``).
    """
    names = {name for name, _ in block.named_modules()}
    if {"attn.proj", "mlp.fc2"} <= names:
        return ["attn.proj", "mlp.fc2"]
    convs = [name for name, module in block.named_modules()
             if isinstance(module, nn.Conv2d) and not name.startswith("downsample")]
    if not convs:
        raise ValueError(f"{type(block).__name__} has neither attn.proj/mlp.fc2 nor a Conv2d: "
                         "cannot tell which layer feeds its residual add")
    return [convs[-1]]
