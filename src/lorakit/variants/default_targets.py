"""How target_modules is resolved as PEFT resolves it, so a config means (and saves) the same in both libraries:
`None` becomes PEFT's default modules for the transformers `model_type` (its tables; a type missing here needs
explicit target_modules, as in PEFT), and a long list is condensed to the suffixes that select it."""

from __future__ import annotations

LORA_DEFAULTS: dict[str, list[str] | str] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

VERA_DEFAULTS = {**LORA_DEFAULTS, "phi": ["q_proj", "v_proj"]}

ADALORA_DEFAULTS: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"], "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"], "deberta": ["in_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"], "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def fill_default_targets(model, config, defaults: dict[str, list[str] | str]) -> None:
    """Set `config.target_modules` from `defaults` for the model's `model_type` when it is None (PEFT does the
    same, so the saved config names the modules). Raises ValueError when there is no default."""
    if config.target_modules is not None:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = defaults.get(model_type)
    if targets is None and getattr(config, "target_parameters", None):
        return  # PEFT: parameters alone are a valid target
    if targets is None:
        raise ValueError(f"Please specify `target_modules` in `peft_config`: there is no default for model_type "
                         f"{model_type!r} (defaults exist for {sorted(defaults)}); give module names, a regex, "
                         "or 'all-linear'")
    config.target_modules = targets if isinstance(targets, str) else sorted(targets)


CONDENSE_FROM = 20  # PEFT rewrites target_modules lists this long into short suffixes (same modules)


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))][::-1]  # shortest first


def condensed_targets(targets: list[str], module_names: list[str]) -> list[str]:
    """PEFT's condensation of a long target list: per target, the shortest dotted suffix that no other module
    ends with; the suffixes select the same modules (so saved configs equal PEFT's)."""
    wanted = set(targets)
    ends = tuple("." + t for t in wanted)
    taken = {s for name in module_names if name not in wanted and not name.endswith(ends) for s in _suffixes(name)}
    chosen: set[str] = set()
    for name, suffixes in sorted(((n, _suffixes(n)) for n in wanted), key=lambda pair: pair[1]):
        for suffix in suffixes:
            if suffix in chosen or suffix in taken:
                continue
            if not any(name.endswith("." + c) for c in chosen):
                chosen.add(suffix)
                break
    return sorted(chosen) if chosen and len(chosen) < len(wanted) else sorted(wanted)
