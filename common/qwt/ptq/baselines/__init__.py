"""PTQ baselines as types: the built-ins (RepQ-ViT, percentile, GPTQ, RTN) and the registry a new one joins."""
from .base import (Baseline, act_quantizer, list_baselines, make_baseline, parse_options, register_baseline,
                   resolve_baseline, weight_quantizer)
from .gptq import GPTQ
from .percentile import Percentile
from .repq_vit import RepQViT
from .rtn import RTN

__all__ = ["Baseline", "RepQViT", "Percentile", "GPTQ", "RTN", "register_baseline", "list_baselines", "make_baseline",
           "resolve_baseline", "act_quantizer", "weight_quantizer", "parse_options"]
