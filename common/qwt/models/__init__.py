"""Model families and the model registry. Each family file defines and registers its family and models."""
from . import convnext, decoder_lm, efficientnet, resnet, swin, vit, vit_fmnist  # noqa: F401  (registration)
from .convnext import convnext_plan
from .efficientnet import efficientnet_plan
from .registry import ModelEntry, create_model, get_model_entry, list_models, register_model
from .resnet import resnet_plan
from .swin import timm_swin_plan
from .vit import vit_plan

__all__ = ["ModelEntry", "register_model", "list_models", "get_model_entry", "create_model", "vit_plan",
           "timm_swin_plan", "efficientnet_plan", "resnet_plan", "convnext_plan"]
