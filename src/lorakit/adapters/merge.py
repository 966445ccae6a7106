"""Merging adapters into the base weights, unloading them, and adapter arithmetic: `AdapterMerging`, a mixin
LoraModel inherits (it uses the model's `_check_known` and `_layers`)."""

from __future__ import annotations

from torch import nn

from ..layers import LoraLayer
from ..quant.nf4 import NF4Linear, requantize_linears
from . import arithmetic
from .inject import unwrap


class AdapterMerging:
    """PEFT's merge_adapter / unmerge_adapter / merge_and_unload / unload / add_weighted_adapter, and resize."""

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge the active adapters (or `adapter_names`) into the base weights, in place and reversibly.
        `safe_merge` checks each merged weight for NaN/inf first (PEFT's option)."""
        for name in adapter_names or []:
            self._check_known(name)
        for layer in self._layers():
            if hasattr(layer, "merge"):  # LoRA layers and trainable-token rows; modules_to_save copies are not merged
                layer.merge(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights again (a no-op where none is merged)."""
        for layer in self._layers():
            if hasattr(layer, "unmerge"):
                layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None, requantize: bool = False) -> nn.Module:
        """Merge the active adapter into the base weights and return the plain model (no lorakit modules).

        On a 4-bit (NF4) base the merged layers come back dequantized (float, compute dtype);
        `requantize=True` quantizes them to NF4 again and records the extra error in
        `model.requantization_error` (mean relative L2 error of the merged weights).
        """
        for name in adapter_names or []:
            self._check_known(name)
        quantized = [n for n, m in self.model.named_modules() if isinstance(m, LoraLayer)
                     and isinstance(m.base_layer, NF4Linear)]
        plain = unwrap(self.model, merge=True, adapter_names=adapter_names, safe_merge=safe_merge,
                       progressbar=progressbar)
        if requantize and quantized:
            plain.requantization_error = requantize_linears(plain, quantized)
        return plain

    def unload(self) -> nn.Module:
        """Remove all adapters without merging and return the plain base model (merged adapters are undone)."""
        return unwrap(self.model, merge=False)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             density: float | None = None, majority_sign_method: str = "total",
                             svd_clamp: float | None = None) -> None:
        """A new adapter from a weighted combination of existing ones (PEFT's semantics; see adapters/arithmetic.py)."""
        arithmetic.add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, density,
                                     majority_sign_method, svd_clamp)

    def resize_adapter(self, adapter_name: str, new_r: int) -> float:
        """Truncated-SVD re-factoring at rank new_r; returns the fraction of ΔW energy kept."""
        return arithmetic.resize_adapter(self, adapter_name, new_r)
