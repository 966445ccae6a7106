"""LoRA variants selectable by configuration (more arrive with issue 7)."""

from .loraplus import create_loraplus_optimizer, loraplus_param_groups

__all__ = ["create_loraplus_optimizer", "loraplus_param_groups"]
