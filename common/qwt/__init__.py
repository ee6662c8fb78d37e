"""QwT — Quantization without Tears.

PTQ baselines (RepQ-ViT, percentile, or one of your own: ``qwt.register_baseline``) and the closed-form block compensation ``out = block_q(x) + W x + b``.

    model = qwt.create_model("vit_fmnist")
    qwt.quantize(model, calib_images, qwt.PTQConfig(w_bits=4, a_bits=4))   # family recognised from the model
    reports = qwt.apply_qwt(model, comp_images)                            # one report per compensated block
"""
from . import models  # noqa: F401  (registers the model families)
from .api import apply_qwt, quantize
from .compensation import BlockPlan, QwTConfig, Step
from .family import Family, family_of, get_family, list_families, register_family
from .models import create_model, get_model_entry, list_models, register_model
from .ptq import Baseline, PTQConfig, calibrate, list_baselines, register_baseline
from .quant import quant_state, set_quant_state
from .serialization import load_quantized, save_quantized
from .size import model_size_mb

__version__ = "0.1.0"

__all__ = ["BlockPlan", "QwTConfig", "Step", "apply_qwt", "quantize", "Family", "family_of", "get_family",
           "list_families", "register_family", "create_model", "get_model_entry", "list_models", "register_model",
           "PTQConfig", "Baseline", "register_baseline", "list_baselines", "calibrate", "quant_state", "set_quant_state", "load_quantized", "save_quantized",
           "model_size_mb"]
