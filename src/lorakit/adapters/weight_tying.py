"""Tied embeddings: an output head whose weight *is* the input embedding's (tie_word_embeddings).

PEFT's `ensure_weight_tying=True` keeps such a pair tied through the adapter:
  - LoRA on the embedding (or on the head): the head gets LoRA factors that are views of the embedding's
    (A_head = B_emb^T, B_head = A_emb^T), so both compute the same ΔW;
  - the embedding (or head) in `modules_to_save`: the head's trainable copy shares the embedding copy's weight;
  - trainable_token_indices: the head shares the embedding's rows (also without the flag, as in PEFT, unless
    the two are given different rows).
Without the flag an adapter on one of a tied pair is applied to that module only (a warning says so).
Merging writes a tied ΔW into the shared weight once (PEFT adds it twice, which breaks the merged model).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from torch import nn

from ..layers import LoraLayer
from ..layers.modules_to_save import ModulesToSaveWrapper
from ..layers.trainable_tokens import TrainableTokensWrapper
from ..utils import replace_module


@dataclass
class TiePlan:
    embedding: str | None  # the input embedding's module name
    head: str | None       # the output head sharing its weight, if any
    lora: bool = False     # tie the head's LoRA factors to the embedding's
    saved: bool = False    # tie the head's modules_to_save copy to the embedding's
    tokens: bool = True    # a tied head shares the embedding's trainable token rows


def _base(module: nn.Module | None) -> nn.Module | None:
    if isinstance(module, LoraLayer):
        return module.base_layer
    if isinstance(module, (ModulesToSaveWrapper, TrainableTokensWrapper)):
        return module.original_module
    return module


def _call(model: nn.Module, method: str) -> nn.Module | None:
    fn = getattr(model, method, None)
    return fn() if callable(fn) else None


def embedding_and_tied_head(model: nn.Module) -> tuple[str | None, str | None]:
    """(input embedding name, name of the output head sharing its weight tensor or None)."""
    embedding, head = _call(model, "get_input_embeddings"), _call(model, "get_output_embeddings")
    names = {id(m): n for n, m in model.named_modules()}
    if head is None and embedding is not None:
        head = _declared_tied_head(model, embedding)
    embedding_name = names.get(id(embedding))
    tied = (embedding is not None and head is not None and _base(head) is not _base(embedding)
            and getattr(_base(head), "weight", None) is getattr(_base(embedding), "weight", object()))
    return embedding_name, names.get(id(head)) if tied else None


def _declared_tied_head(model: nn.Module, embedding: nn.Module) -> nn.Module | None:
    """A model without get_output_embeddings (custom models) names its tied weights in `_tied_weights_keys`
    (transformers' attribute: a list of parameter names, or a {tied: source} dict): the first named module other
    than the embedding whose weight is the embedding's, the output head first."""
    config = getattr(model, "config", None)
    if config is not None and not getattr(config, "tie_word_embeddings", True):
        return None  # the config says untied (PEFT reads it the same way)
    keys = getattr(model, "_tied_weights_keys", None) or []
    names = sorted((k.removesuffix(".weight") for k in keys), key=lambda n: not n.endswith("lm_head"))
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if _base(module) is not _base(embedding) and getattr(_base(module), "weight", None) is \
                getattr(_base(embedding), "weight", object()):
            return module
    return None


def plan_tying(model: nn.Module, config, targets: list[str], saved: list[str],
               token_targets: list[tuple[str, list[int]]]):
    """Decide what to tie before any module is touched; returns (plan, targets, saved, token_targets)."""
    embedding, head = embedding_and_tied_head(model)
    plan = TiePlan(embedding, head)
    ensure = getattr(config, "ensure_weight_tying", False)
    tied_pair = {embedding, head} - {None}
    in_targets, in_saved = bool(tied_pair & set(targets)), bool(tied_pair & set(saved))
    if ensure and head is None and not token_targets:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model")
    elif ensure and head is not None:
        if in_saved:
            plan.saved = True
            saved = [n for n in saved if n != head] + ([embedding] if embedding not in saved else [])
            config.modules_to_save = _moved_to_embedding(config.modules_to_save, embedding, head)
        elif in_targets:
            plan.lora = True
            targets = [n for n in targets if n not in tied_pair] + [embedding, head]
            config.target_modules = _moved_to_embedding(config.target_modules, embedding, head)
        elif not token_targets:
            warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                          "`modules_to_save` or `target_modules`")
    elif head is not None and (in_saved or in_targets):
        warnings.warn("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but "
                      "`ensure_weight_tying` is not set to True: the adapter applies to that module only, so the "
                      "two stop being tied (merging or exporting the model then unties them).")
    return plan, targets, saved, _plan_tokens(plan, token_targets, saved, ensure)


def _moved_to_embedding(names: list[str] | str, embedding: str, head: str) -> list[str] | str:
    """PEFT rewrites the config this way (so saved configs match): the embedding's full name added, the first
    entry naming the head dropped; a regex gets `|^embedding$` added."""
    if isinstance(names, str):
        return rf"(?:{names}|^{re.escape(embedding)}$)"
    names = list(dict.fromkeys([*names, embedding]))
    drop = next((n for n in names if re.match(rf"(^|.*\.){n}($|\..*)", head)), None)
    return sorted(n for n in names if n != drop)


def _plan_tokens(plan: TiePlan, token_targets, saved: list[str], ensure: bool):
    for name, _ in token_targets:
        if name in saved:
            raise ValueError(f"The embedding layer is already marked to be trained fully, either specify "
                             f'`modules_to_save=[..., "{name}", ...]` or `trainable_tokens={{\'{name}\': x}}` '
                             "but not both.")
    if token_targets and ensure and plan.head is None:
        warnings.warn("ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings="
                      "False). Weight tying will not be applied for trainable_token_indices.")
    indices = dict(token_targets)
    if plan.head in indices and plan.embedding in indices:
        if indices[plan.head] == indices[plan.embedding]:
            return [(n, ids) for n, ids in token_targets if n != plan.head]  # the tie covers the head
        if ensure:
            raise ValueError("Cannot ensure weight tying when different token indices are specified for tied "
                             f"layers. Conflicting layers: {plan.embedding}: {indices[plan.embedding]}, "
                             f"{plan.head}: {indices[plan.head]}. Please use the same indices for all tied "
                             "layers or set ensure_weight_tying=False.")
        plan.tokens = False
    return token_targets


def apply_tying(model: nn.Module, plan: TiePlan, adapter_name: str) -> None:
    """Make the head's adapter share the embedding's tensors, per `plan` (after both got the adapter)."""
    if plan.head is None:
        return
    embedding, head = model.get_submodule(plan.embedding), model.get_submodule(plan.head)
    if plan.lora:
        A, B = embedding.pair(adapter_name)  # embedding: A (r, vocab), B (dim, r); head: A (r, dim), B (vocab, r)
        head.lora_A[adapter_name].weight = nn.Parameter(B.detach().t())
        head.lora_B[adapter_name].weight = nn.Parameter(A.detach().t())
        head.tied_adapters.add(adapter_name)  # the embedding merges the shared ΔW; the head must not add it again
    if plan.saved:
        if not isinstance(head, ModulesToSaveWrapper):
            head = ModulesToSaveWrapper(head)
            replace_module(model, plan.head, head)
        if adapter_name not in head.modules_to_save:
            head.add_adapter(adapter_name)
        copy = head.modules_to_save[adapter_name]
        copy.weight = embedding.modules_to_save[adapter_name].weight
        copy.train()  # PEFT builds this copy anew, so it starts in training mode
