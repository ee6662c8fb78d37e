import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from qwt.quant.modules import quant_modules  # noqa: E402
from qwt.quant.quantizers import LogSqrt2Quantizer, Quantizer  # noqa: E402


@pytest.fixture
def tiny_vit() -> VisionTransformer:
    """A random-init timm ViT small enough for CPU tests (16 tokens + cls, 3 blocks)."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))


U = 2.0**-24  # FP32 unit roundoff


def _one_ulp_tie_rate(model: torch.nn.Module, images: torch.Tensor, only: list[Quantizer] | None = None) -> float:
    """Expected number of activation codes per image that move when every quantiser input moves by one ulp.

    An input x moved by u·|x| moves its code argument t by u·|x|·|dt/dx|: u·|x/Δ| on a uniform grid (in-range
    values only; clipped ones cannot move), u·2/ln 2 on the log-√2 grid (t = −2·log2(x/Δ)). With the fractional
    parts of t spread evenly, the code changes with probability 2·that (a window either side of each tie).
    ``only``: count these quantisers alone (those that see the difference first), else every enabled one.
    """
    total, hooks = [0.0], []

    def add(q, inputs, _output) -> None:
        x = inputs[0]
        if isinstance(q, LogSqrt2Quantizer):
            total[0] += 2 * U * (2 / math.log(2)) * x.numel()
        else:
            t = x / q.delta
            code = torch.round(t) + q.zero_point
            total[0] += 2 * U * float(t.abs()[(code >= 0) & (code <= q.levels - 1)].sum())

    quantizers = only if only is not None else [q for _, m in quant_modules(model) for q in m.activation_quantizers()]
    hooks += [q.register_forward_hook(add) for q in quantizers if q.enabled]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    return total[0] / len(images)


def tie_changes_allowed(expected: float, images: int) -> int:
    """How many of ``images`` may change when ``expected`` changes are expected: the count is then about Poisson
    distributed, and this is its 1 − 10⁻⁴ quantile (a test exceeds it by chance once in 10⁴ machines or seeds).
    Fails when that leaves fewer than half the images bound to agree: the statement would say nothing."""
    k, term = 0, math.exp(-expected)
    tail = 1.0 - term
    while tail > 1e-4:
        k += 1
        term *= expected / k
        tail -= term
    assert k < images / 2, f"{expected:.2f} changes expected in {images} images: too many for a statement"
    return k


def _agree_up_to_code_ties(model: torch.nn.Module, probe: torch.Tensor, got: torch.Tensor,
                           expected: torch.Tensor) -> None:
    """Two computations of ``model``'s logits that differ by FP rounding, per layer about an ulp (a fold, another
    kernel): an image changes at all only where a downstream activation code sits that close to a tie. Twice the
    one-ulp estimate (inputs off by up to two ulps), measured on ``probe`` images, gives the expected number of
    changed images; at most :func:`tie_changes_allowed` of them may change, and only those may change class.
    Every other image must agree to FP rounding."""
    scale = float(expected.abs().max())
    changed = ((got - expected).abs() > 1e-4 * scale).flatten(1).any(1)
    allowed = tie_changes_allowed(2 * _one_ulp_tie_rate(model, probe) * len(got), len(got))
    assert int(changed.sum()) <= allowed, f"{int(changed.sum())} of {len(changed)} images changed, {allowed} allowed"
    torch.testing.assert_close(got[~changed], expected[~changed], rtol=1e-4, atol=1e-4 * scale)
    assert int((got.argmax(1) != expected.argmax(1)).sum()) <= allowed


@pytest.fixture
def agree_up_to_code_ties() -> Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """The check of :func:`_agree_up_to_code_ties`, for tests comparing two computations of a quantised model."""
    return _agree_up_to_code_ties


@pytest.fixture
def changes_allowed() -> Callable[[float, int], int]:
    """:func:`tie_changes_allowed`, for tests that estimate the expected changes themselves."""
    return tie_changes_allowed


@pytest.fixture
def one_ulp_tie_rate() -> Callable[..., float]:
    """:func:`_one_ulp_tie_rate`, for tests that bound the changes at chosen quantisers."""
    return _one_ulp_tie_rate


def _resign(saved, state=None, edit=None):
    """Rewrite a save as a forger who knows the format would: tensors and description changed, every checksum
    and the description's hash recomputed, so only the checks of the contents themselves can refuse it."""
    from safetensors.torch import load_file, save_file

    from qwt.serialization import HASH_KEY, tensor_sha256

    state = load_file(str(saved / "model.safetensors")) if state is None else state
    meta = json.loads((saved / "qwt.json").read_text())
    meta["tensors"] = {k: tensor_sha256(v) for k, v in state.items()}
    if edit is not None:
        edit(meta)
    text = json.dumps(meta, indent=2)
    (saved / "qwt.json").write_text(text)
    save_file(state, str(saved / "model.safetensors"),
              metadata={"format": "pt", HASH_KEY: hashlib.sha256(text.encode()).hexdigest()})


@pytest.fixture
def resign() -> Callable[..., None]:
    """``resign(saved, state=None, edit=None)``: a consistently forged save (see :func:`_resign`)."""
    return _resign
