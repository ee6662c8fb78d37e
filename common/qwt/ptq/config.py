"""What to quantise and how: one frozen config applied to a model (the torchao style)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..quant.quantizers import check_bits

Method = Literal["repq_vit", "percentile", "rtn"]
LayerMap = Literal["qwt", "repq_vit"]
#: Activations of ``rtn``: per token, min-max at run time (dynamic), or one static per-tensor grid (percentile).
ActGranularity = Literal["token", "tensor"]


@dataclass(frozen=True)
class PTQConfig:
    """Post-training quantisation settings.

    method: ``repq_vit`` (channel-wise post-LayerNorm inputs reparameterised, log-√2 post-softmax) or
        ``percentile`` (every activation per tensor, uniform softmax quantiser, no reparameterisation).
    layer_map: ``qwt`` keeps patch-embed and classifier head at W8A8 as the QwT authors do; ``repq_vit`` is
        RepQ-ViT's original map (patch-embed input 8-bit, weights and head at W/A bits).
    log_floor: clamp of x/Δ before log2 in the log-√2 quantiser (QwT authors: 1e-6; RepQ-ViT: None).
    conv_act_bits: CNNs only; force every conv input to this width. The first release of the authors' ResNet
        code did this with 8 bits, so its "W4/A4" table was really W4/A8. None = use ``a_bits``.
    ``rtn`` (language models, qwt.ptq.rtn): min-max round-to-nearest weights per output channel, or per group of
    ``w_group_size`` input columns; Linear inputs per token at run time (``act_granularity="token"``) or per
    tensor, static (``"tensor"``); ``a_bits=None`` leaves activations in floating point (weights only, "A16").
    """

    method: Method = "repq_vit"
    w_bits: int = 4
    a_bits: int | None = 4
    layer_map: LayerMap = "qwt"
    log_floor: float | None = 1e-6
    conv_act_bits: int | None = None
    w_group_size: int | None = None
    act_granularity: ActGranularity = "token"

    def __post_init__(self) -> None:
        if self.method not in ("repq_vit", "percentile", "rtn"):
            raise ValueError(f"unknown PTQ method {self.method!r}; choose 'repq_vit', 'percentile' or 'rtn'")
        if self.method != "rtn" and (self.a_bits is None or self.w_group_size is not None):
            raise ValueError(f"weights-only quantisation and weight groups need method 'rtn', not {self.method!r}")
        if self.w_group_size is not None and self.w_group_size < 1:
            raise ValueError(f"w_group_size must be ≥ 1 or None (per output channel), got {self.w_group_size}")
        if self.act_granularity not in ("token", "tensor"):
            raise ValueError(f"unknown act_granularity {self.act_granularity!r}; choose 'token' or 'tensor'")
        if self.layer_map not in ("qwt", "repq_vit"):
            raise ValueError(f"unknown layer map {self.layer_map!r}; choose 'qwt' or 'repq_vit'")
        check_bits(self.w_bits)
        if self.a_bits is not None:
            check_bits(self.a_bits)
        if self.conv_act_bits is not None:
            check_bits(self.conv_act_bits)
        if self.log_floor is not None and not (isinstance(self.log_floor, (int, float)) and 0 < self.log_floor < 1):
            raise ValueError(f"log_floor must be in (0, 1) or None (no floor), got {self.log_floor!r}")

    @property
    def tag(self) -> str:
        """Short bit label, e.g. ``W4A4``; ``W3A16`` for weights only, ``W4g128A8`` with weight groups."""
        group = f"g{self.w_group_size}" if self.w_group_size else ""
        return f"W{self.w_bits}{group}A{16 if self.a_bits is None else self.a_bits}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PTQConfig":
        return cls(**data)
