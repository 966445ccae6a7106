"""Saving and loading adapters the way PEFT's PeftModel does: `AdapterFiles`, a mixin LoraModel inherits.

Files are PEFT's format (peft_format.py); loading for inference leaves the model in eval mode, as PEFT does.
The mixin uses the model's own bookkeeping (`_check_known`, `_layers`, `_set_trainable`, `add_adapter`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from ..layers import LoraLayer
from ..variants.lora_config import DEFAULT_ADAPTER, LoraConfig
from . import peft_format
from .model_card import write_model_card


class AdapterFiles:
    """PEFT's save_pretrained / save_adapter / load_adapter / from_pretrained, as LoraModel methods."""

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: str | bool = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: str | None = None,
                        **_) -> None:
        """Write each adapter in PEFT's format: 'default' in `save_directory`, others in a subfolder, and PEFT's
        model card (README.md: Hub metadata; an existing card keeps its text).

        `safe_serialization=False` writes `adapter_model.bin` (pickle) as PEFT does; `is_main_process=False`
        writes nothing (distributed runs). `path_initial_model_for_weight_conversion`: where a PiSSA/OLoRA
        adapter was saved right after initialisation; the adapter is then written as a plain LoRA of rank 2r on
        the original base weights (ΔW = s·(BA - B0A0)), portable to any copy of the original model (PEFT's option).
        `save_embedding_layers` as in PEFT: "auto" also writes the base embedding weights when `target_modules`
        names `embed_tokens` / `lm_head` (True: always, False: never).
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a directory")
        for name in selected_adapters or []:
            self._check_known(name)
        if not is_main_process:
            return
        config = self.active_peft_config or next(iter(self.peft_config.values()))
        os.makedirs(save_directory, exist_ok=True)
        write_model_card(save_directory, self.get_base_model(), config.peft_type, config.task_type == "CAUSAL_LM")
        for name in selected_adapters or list(self.peft_config):
            out_dir = save_directory if name == DEFAULT_ADAPTER else os.path.join(save_directory, name)
            self.save_adapter(name, out_dir, path_initial_model_for_weight_conversion, safe_serialization,
                              save_embedding_layers)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload adapter", **save_kwargs):
        """Save (as save_pretrained, with `save_kwargs`) and upload to the Hugging Face Hub repo `repo_id`,
        created if missing. Needs network access and a token (`token` or `huggingface-cli login`)."""
        from huggingface_hub import HfApi  # imports inside functions: only uploading needs the Hub client

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, **save_kwargs)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)

    def save_adapter(self, adapter_name: str, directory: str, initial_adapter_dir: str | None = None,
                     safe_serialization: bool = True, save_embedding_layers: str | bool = "auto") -> None:
        """Write one adapter in PEFT's format into exactly `directory` (see save_pretrained for the conversion)."""
        self._check_known(adapter_name)
        config = self.peft_config[adapter_name]
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        if any(isinstance(l, LoraLayer) and adapter_name in l.merged_adapters for l in self._layers()):
            warnings.warn(f"adapter {adapter_name!r} is merged into the base weights; saving its (unchanged) factors")
        state = peft_format.adapter_state_dict(self.model, adapter_name, config, save_embedding_layers)
        saved = self._saved_config(config)
        if initial_adapter_dir is not None:
            saved, state = peft_format.converted_to_plain_lora(saved, state, initial_adapter_dir)
        peft_format.write_adapter(directory, saved, state, safe_serialization)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, torch_device=None,
                     autocast_adapter_dtype: bool = True, allow_pickle: bool = False, config: LoraConfig | None = None,
                     **_):
        """Load a PEFT-format adapter directory as a new adapter `adapter_name` (not activated). Returns PEFT's
        load result (missing / unexpected keys; both empty: lorakit refuses a file that does not fit). Without
        `is_trainable` the model is put in eval mode, as PEFT does (no dropout at inference)."""
        config, state = self._read_adapter(model_id, is_trainable, allow_pickle, config)
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            peft_format.load_adapter_weights(self.model, adapter_name, state, source=str(model_id))
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self._set_trainable()
        if not is_trainable:
            self.eval()
        return _IncompatibleKeys([], [])

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = DEFAULT_ADAPTER,
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        autocast_adapter_dtype: bool = True, allow_pickle: bool = False, **_):
        """Wrap `model` with the adapter saved in `model_id` (ours or PEFT's); eval mode unless `is_trainable`.
        `config` replaces the file's adapter_config.json, as in PEFT."""
        config, state = cls._read_adapter(model_id, is_trainable, allow_pickle, config)
        peft_model = cls.class_for(config)(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            peft_format.load_adapter_weights(peft_model.model, adapter_name, state, source=str(model_id))
        except Exception:
            peft_model.unload()
            raise
        return peft_model if is_trainable else peft_model.eval()

    @staticmethod
    def _read_adapter(model_id, is_trainable: bool, allow_pickle: bool, config: LoraConfig | None):
        file_config, state = peft_format.read_adapter(str(model_id), allow_pickle=allow_pickle)
        config = file_config if config is None else config  # a config passed in is used as is, as in PEFT
        config.inference_mode = not is_trainable
        return config, state

    @staticmethod
    def _saved_config(config: LoraConfig) -> LoraConfig:
        # A saved adapter is an inference artefact by default, as in PEFT.
        return dataclasses.replace(config, inference_mode=True)


def cast_to_base_dtype(layers, adapter_name: str) -> None:
    """PEFT's autocast_adapter_dtype=False: the adapter takes an fp16/bf16 base layer's dtype (default: fp32)."""
    for layer in layers:
        if not isinstance(layer, LoraLayer):
            continue
        # the base's first float parameter (MultiheadAttention has in_proj_weight, no `weight`)
        dtype = next((p.dtype for p in layer.base_layer.parameters() if p.is_floating_point()), None)
        if dtype in (torch.float16, torch.bfloat16):
            with torch.no_grad():
                for p in layer.adapter_parameters(adapter_name).values():
                    p.data = p.data.to(dtype)
