"""PEFT's task classes (PeftModelForCausalLM, ...ForSequenceClassification, ...) and get_peft_model, which
returns the one for the config's task_type."""

from __future__ import annotations

import warnings

from torch import nn

from ..variants.lora_config import DEFAULT_ADAPTER, LoraConfig
from .model import LoraModel


class _NamedForward(LoraModel):
    """A forward that names PEFT's task arguments: transformers' Trainer keeps only the dataset columns the
    model's forward names (and finds `labels` there), so `forward(*args, **kwargs)` would lose them all."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, adapter_names=None, **kwargs):
        """The model's forward with PEFT's task arguments named (so transformers' Trainer keeps those dataset columns)."""
        named = dict(attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                     output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                     return_dict=return_dict)
        first = () if input_ids is None else (input_ids,)  # positional, as before: a vision model's first input
        return super().forward(*first, adapter_names=adapter_names,
                               **{k: v for k, v in named.items() if v is not None}, **kwargs)


class PeftModelForCausalLM(_NamedForward):
    """PEFT's task class for task_type="CAUSAL_LM"."""


class PeftModelForSeq2SeqLM(_NamedForward):
    """task_type="SEQ_2_SEQ_LM"."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, adapter_names=None, **kwargs):
        """The seq2seq forward with PEFT's arguments named, decoder inputs included."""
        decoder = dict(decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                       decoder_inputs_embeds=decoder_inputs_embeds)
        return super().forward(input_ids, attention_mask, inputs_embeds, labels, output_attentions,
                               output_hidden_states, return_dict, adapter_names,
                               **{k: v for k, v in decoder.items() if v is not None}, **kwargs)


class PeftModelForFeatureExtraction(_NamedForward):
    """task_type="FEATURE_EXTRACTION"."""


class _WithTaskHead(_NamedForward):
    """A task class whose head is trained in full: its names join `modules_to_save` (PEFT's behaviour)."""

    HEAD_NAMES: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER, **kwargs):
        config.modules_to_save = [*(config.modules_to_save or []), *self.HEAD_NAMES]
        super().__init__(model, config, adapter_name, **kwargs)

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, **kwargs) -> None:
        """Add an adapter; the task head joins its modules_to_save, as for the first one."""
        if self.peft_config:  # the first adapter's config was extended in __init__
            peft_config.modules_to_save = [*(peft_config.modules_to_save or []), *self.HEAD_NAMES]
        super().add_adapter(adapter_name, peft_config, **kwargs)


class PeftModelForSequenceClassification(_WithTaskHead):
    """task_type="SEQ_CLS": the `classifier` / `score` head is trained and saved in full."""

    HEAD_NAMES = ("classifier", "score")


class PeftModelForTokenClassification(_WithTaskHead):
    """task_type="TOKEN_CLS": the `classifier` / `score` head is trained and saved in full."""

    HEAD_NAMES = ("classifier", "score")


class PeftModelForQuestionAnswering(_WithTaskHead):
    """task_type="QUESTION_ANS": the `qa_outputs` head is trained and saved in full."""

    HEAD_NAMES = ("qa_outputs",)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, start_positions=None,
                end_positions=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                adapter_names=None, **kwargs):
        """The question-answering forward with PEFT's arguments named (start and end positions for the loss)."""
        spans = dict(start_positions=start_positions, end_positions=end_positions)
        return super().forward(input_ids, attention_mask, inputs_embeds, None, output_attentions,
                               output_hidden_states, return_dict, adapter_names,
                               **{k: v for k, v in spans.items() if v is not None}, **kwargs)


TASK_MODEL_CLASSES: dict[str, type[LoraModel]] = {
    "CAUSAL_LM": PeftModelForCausalLM, "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM, "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification, "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction}


LoraModel.task_classes.update(TASK_MODEL_CLASSES)  # PeftModel.from_pretrained builds these too


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER, mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> LoraModel:
    """Inject LoRA adapters described by `peft_config` into `model`; only the adapters are trainable. Returns
    PEFT's task class for `task_type` (PeftModelForCausalLM, ...). `mixed` is accepted: every lorakit model
    can hold adapters of different forms.

    >>> model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))  # doctest: +SKIP
    """
    if isinstance(model, LoraModel):
        raise ValueError("model already has LoRA adapters; use model.add_adapter(name, config) to add another")
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(f"peft config has already set base model revision to {peft_config.revision}, "
                          f"overwriting with revision {revision}")
        peft_config.revision = revision
    return LoraModel.class_for(peft_config)(model, peft_config, adapter_name,
                                            autocast_adapter_dtype=autocast_adapter_dtype)
