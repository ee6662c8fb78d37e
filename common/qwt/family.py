"""Model families: everything the library needs to know about one kind of network, in one object.

A family says how to recognise its models, which layers get which bits (its layer rule, token model or CNN),
its default PTQ baseline (what ``PTQConfig()`` runs on its models), which LayerNorm → Linear pairs it has
(RepQ-ViT reparameterises them; a baseline that needs them refuses a family without), how QwT walks the model
(stem, blocks, compensation form), which modules form the classifier (trained by QwT*), which layer ends each
residual branch of a block (where channel-wise compensation acts and where a W8A8 conv output is quantised), and
what inputs its models take. Each family is defined and registered in its model file (``qwt/models/<family>.py``),
as timm keeps a model's config next to its code.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .compensation.blockwise import BlockPlan
from .inputs import InputCheck, check_images
from .ptq.config import PTQConfig
from .ptq.reparameterize import NormLinearPairs
from .ptq.surgery import LayerRule
from .registry import Registry


@dataclass(frozen=True)
class Family:
    name: str
    matches: Callable[[nn.Module], bool]
    layer_rule: Callable[[nn.Module, PTQConfig], LayerRule]
    plan: Callable[[nn.Module], BlockPlan]
    #: the registered baseline ``PTQConfig()`` (baseline left unset) and ``--method``'s default run on this family,
    #: and the activation partner of a baseline that leaves it open (``GPTQ(activations=None)``)
    default_baseline: str
    norm_linear_pairs: NormLinearPairs = ()
    classifier: tuple[str, ...] = ()  # module paths of the classifier head(s)
    #: (model, block path) → the last Linear/Conv of each residual branch of that block, relative to it (the
    #: shortcut excluded); None if the family does not say (channel-wise compensation then refuses it).
    residual_branches: Callable[[nn.Module, str], list[str]] | None = None
    #: refuses inputs the family's models do not take (images by default; token ids for language models)
    check_inputs: InputCheck = check_images

    def __post_init__(self) -> None:
        """Refuse a default baseline that is not registered or cannot run on this family, at registration rather
        than at the first ``PTQConfig()`` a user quantises with."""
        if not isinstance(self.default_baseline, str):
            raise ValueError(f"family {self.name!r}: default_baseline must be a registered PTQ method's name, got "
                             f"{self.default_baseline!r}")
        try:
            PTQConfig().for_family(self)
        except ValueError as err:
            raise ValueError(f"family {self.name!r}: default_baseline {self.default_baseline!r}: {err}") from None


_FAMILIES: Registry[Family] = Registry("model family")


def register_family(family: Family) -> Family:
    return _FAMILIES.add(family.name, family)


def get_family(name: str) -> Family:
    return _FAMILIES.lookup(name)


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def family_of(model: nn.Module) -> Family:
    """The registered family that recognises ``model`` (the most recently registered wins a tie)."""
    for family in reversed(list(_FAMILIES.values())):
        if family.matches(model):
            return family
    raise ValueError(f"no registered model family recognises {type(model).__name__}; register one with "
                     "qwt.register_family (see README, 'Using QwT on your own model') or pass family=")
