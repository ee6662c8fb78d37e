import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


@pytest.fixture
def tiny_vit() -> VisionTransformer:
    """A random-init timm ViT small enough for CPU tests (16 tokens + cls, 3 blocks)."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
