"""The README.md model card PEFT writes beside a saved adapter: Hub metadata (library, base model, tags).

An existing card keeps its text and metadata; only `library_name`, `tags` and `base_model` are set, so the Hub
lists the adapter as a PEFT LoRA of its base model. huggingface_hub (a transformers dependency) renders the card.
"""

from __future__ import annotations

import os

from ..utils import atomic_path

# imports inside functions: transformers / huggingface_hub load only when a card is written; lorakit's root
# (for __version__) is this package's parent, imported lazily

CARD_NAME = "README.md"


def adapter_tags(model, peft_type: str) -> list[str]:
    """PEFT's tags: the base model's own, `transformers` for a transformers model, `lora` for LoRA adapters and
    `base_model:adapter:<name_or_path>` for a model that has the attribute."""
    from transformers import PreTrainedModel

    tags = set(getattr(model, "model_tags", None) or [])
    if isinstance(model, PreTrainedModel):
        tags.add("transformers")
    if peft_type == "LORA":
        tags.add("lora")
    if hasattr(model, "name_or_path"):  # transformers models (PEFT tags even an empty name)
        tags.add(f"base_model:adapter:{model.name_or_path}")
    return sorted(tags)


def write_model_card(directory: str, model, peft_type: str, causal_lm: bool) -> None:
    """Create or update `directory`/README.md (atomically) for an adapter of `model` (the base model)."""
    from huggingface_hub import ModelCard, ModelCardData

    from .. import __version__

    path = os.path.join(directory, CARD_NAME)
    card = ModelCard.load(path) if os.path.isfile(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    tags = adapter_tags(model, peft_type)
    if tags:
        card.data["tags"] = tags
    if causal_lm and not card.data.pipeline_tag:
        card.data.pipeline_tag = "text-generation"
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if name:
        card.data["base_model"] = name
    text = card.text
    versions_line = f"- lorakit {__version__}"
    if versions_line not in text.splitlines():
        text = text.rstrip("\n") + f"\n\n### Framework versions\n\n{versions_line}\n"
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"---\n{card.data.to_yaml()}\n---\n{text}")
