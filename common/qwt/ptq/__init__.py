"""PTQ: a baseline (RepQ-ViT, percentile, GPTQ, or one of your own) applied to a model.

The sequence is one function for every task and baseline: module surgery with the family's layer rule (which
asks the baseline for each quantiser), a calibration forward, then the baseline's post-calibration step
(RepQ-ViT's reparameterisation, GPTQ's weight rounding). The forward is pluggable (a classifier runs
``model(images)``, a detector ``model.test_step(batch)``).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .baselines import Baseline, act_quantizer, list_baselines, register_baseline, weight_quantizer
from .calibration import Batches, CalibrationForward, PhaseHook, calibrate, calibrate_weights, default_forward
from .config import PTQConfig
from .reparameterize import layernorm_linear_pairs, reparameterize, reparameterize_model
from .surgery import LayerRule, attention_matmuls, cnn_rule, quantize_modules, token_rule

__all__ = ["PTQConfig", "Baseline", "Batches", "register_baseline", "list_baselines", "LayerRule",
           "CalibrationForward", "PhaseHook", "calibrate", "calibrate_weights", "apply_ptq", "applied_config",
           "quantize_modules", "token_rule", "cnn_rule", "act_quantizer", "weight_quantizer", "attention_matmuls",
           "reparameterize", "reparameterize_model", "layernorm_linear_pairs"]

#: Attribute of a quantised model's root module holding the PTQConfig that quantised it: a plain attribute, not a
#: buffer (no state-dict entry), carried by ``copy.deepcopy``; :func:`qwt.save_quantized` saves what it states.
APPLIED_CONFIG = "qwt_ptq_config"


def applied_config(model: nn.Module) -> PTQConfig | None:
    """The config :func:`apply_ptq` (or :func:`qwt.load_quantized`) quantised ``model`` with; None for a model
    quantised by hand (module surgery and calibration called directly)."""
    config = getattr(model, APPLIED_CONFIG, None)
    return config if isinstance(config, PTQConfig) else None


def apply_ptq(model: nn.Module, data: Any, config: PTQConfig, rule: LayerRule,
              pairs: tuple[tuple[str, str], ...] = (), forward: CalibrationForward = default_forward,
              on_phase: PhaseHook | None = None, post_calibration_data: Any = None) -> list[str]:
    """Quantise ``model`` in place with ``rule`` and calibrate it on ``data``; returns the reparameterised norms.

    Calibrate (every quantiser fits what it sees; weights rounded to nearest), then the baseline's
    post-calibration step on the LayerNorm → Linear ``pairs`` (RepQ-ViT: reparameterise and re-fit the reset
    weight quantisers; GPTQ: its activation partner's step, then GPTQ's rounding of every weight). ``config`` is
    resolved for the model's family (:meth:`PTQConfig.for_family`), as ``rule`` was built from it.
    ``post_calibration_data`` (default ``data``) is what the post-calibration step runs on: GPTQ's Hessians may
    take more inputs (e.g. a :class:`Batches` of many windows) than the static ranges are calibrated on.
    ``on_phase`` is called after each phase. Quantisation is left on, and ``config`` is remembered on the model
    (:func:`applied_config`), so a saved model states what ran.
    """
    model.eval()
    quantize_modules(model, rule)
    calibrate(model, data, forward)
    if on_phase:
        on_phase("calibrate")
    post = data if post_calibration_data is None else post_calibration_data
    norms = config.resolved_baseline().after_calibration(model, post, forward, pairs, on_phase)
    setattr(model, APPLIED_CONFIG, config)
    return norms
