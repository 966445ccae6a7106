"""Adapter forms (one file each: lora, dora, vera, adalora; see form.py for the interface), plus what
trains them differently: LoRA+ learning rates, PiSSA / OLoRA initialisation, the rank probe.

The forms are registered in lorakit/forms.py. This package's namespace imports nothing that needs
lorakit.config, so config.py can import the plain LoRA and DoRA forms."""

from .loraplus import create_loraplus_optimizer, loraplus_param_groups

__all__ = ["create_loraplus_optimizer", "loraplus_param_groups"]
