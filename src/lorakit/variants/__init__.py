"""LoRA variants selectable by configuration: DoRA, PiSSA/OLoRA, VeRA, AdaLoRA, LoRA+, layer-wise rank."""

from .adalora import RankAllocator, orthogonal_regularization
from .loraplus import create_loraplus_optimizer, loraplus_param_groups
from .rank_probe import suggest_rank_pattern

__all__ = ["RankAllocator", "create_loraplus_optimizer", "loraplus_param_groups", "orthogonal_regularization",
           "suggest_rank_pattern"]
