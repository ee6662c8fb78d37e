"""One PTQ → QwT run on a float model, as every task script does it: timings, sizes and top-1 rows."""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .api import apply_qwt, quantize
from .compensation import BlockReport, QwTConfig
from .compensation.blockwise import check_qwt_config, compensated_blocks
from .family import family_of
from .ptq import PTQConfig
from .size import model_size_mb
from .utils import PhaseTimer

Evaluate = Callable[[nn.Module, str], float]
Row = dict[str, Any]


@dataclass
class RunResult:
    rows: list[Row]
    model: nn.Module
    blocks: list[BlockReport]
    phases: dict[str, float] = field(default_factory=dict)


def ptq_then_qwt(name: str, fp_model: nn.Module, calib_images: torch.Tensor, comp_images: torch.Tensor | Iterable,
                 evaluate: Evaluate, ptq_config: PTQConfig, qwt_config: QwTConfig = QwTConfig(),
                 batch_size: int = 32, progress: bool = True, on_row: Callable[[Row], None] | None = None) -> RunResult:
    """Quantise a copy of ``fp_model`` (its family recognised from the model), evaluate, compensate, evaluate.

    Rows follow the results schema (model, bits, method, top1, calib_seconds, size_mb); the QwT row's
    calib_seconds is the whole calibration (PTQ + QwT), as a user waits for it. ``on_row`` gets each row as
    soon as it exists (so a caller can record it before the next, possibly failing, step).
    """
    model = copy.deepcopy(fp_model).eval()
    check_qwt_config(qwt_config, compensated_blocks(family_of(model).plan(model)))
    timer = PhaseTimer()
    quantize(model, calib_images, ptq_config, on_phase=timer)
    ptq_seconds = timer.total
    base = {"model": name, "bits": ptq_config.tag}
    rows = [{**base, "method": "ptq", "top1": evaluate(model, f"{name} {ptq_config.tag} PTQ"),
             "calib_seconds": ptq_seconds, "size_mb": model_size_mb(model)}]
    if on_row is not None:
        on_row(rows[-1])
    timer.restart()
    blocks = apply_qwt(model, comp_images, qwt_config, batch_size=batch_size, progress=progress)
    timer("qwt")
    rows.append({**base, "method": "ptq+qwt", "top1": evaluate(model, f"{name} {ptq_config.tag} PTQ+QwT"),
                 "calib_seconds": timer.total, "size_mb": model_size_mb(model)})
    if on_row is not None:
        on_row(rows[-1])
    return RunResult(rows=rows, model=model, blocks=blocks, phases=dict(timer.phases))
