"""PTQ baselines as types: the built-ins (RepQ-ViT, percentile) and the registry a new one joins."""
from .base import (Baseline, act_quantizer, default_baseline, list_baselines, make_baseline, register_baseline,
                   resolve_baseline, weight_quantizer)
from .percentile import Percentile
from .repq_vit import RepQViT

__all__ = ["Baseline", "RepQViT", "Percentile", "register_baseline", "list_baselines", "make_baseline",
           "resolve_baseline", "default_baseline", "act_quantizer", "weight_quantizer"]
