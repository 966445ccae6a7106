"""Module targets on mixture-of-experts models resolved as PEFT 0.21 resolves them under transformers 5.

In transformers 4 each expert was an nn.Linear (Mixtral: `experts.N.w1/w2/w3`, Qwen-MoE style: `experts.N.gate_proj/
up_proj/down_proj`) and the router an nn.Linear `gate`; transformers 5 stores the experts as 3-D parameters
(`experts.gate_up_proj`, `experts.down_proj`) and the router as a bare `gate.weight`. PEFT keeps configs written
for the old layout meaning the same thing: names of the old expert/router layers in `target_modules` (and
"all-linear", which used to include them) become `target_parameters`, and where two old layers are fused into one
parameter (w1 + w3 -> gate_up_proj) its rank and alpha double (rank_pattern / alpha_pattern), so alpha/r is kept.
lorakit applies the same rewrite, so a config targets (and saves) the same parameters in both libraries.
"""

from __future__ import annotations

import re

import torch

from ..layers.parameter import LoraParameter

# transformers 4 layer name -> transformers 5 parameter, per conversion pattern (PEFT 0.21's tables)
RENAMED = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
try:  # transformers 5's table of model types whose MoE experts are fused 3-D parameters
    from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as CONVERSION_PATTERNS
except ImportError:
    CONVERSION_PATTERNS = None
FUSED = {"mixtral": {"gate_up_proj": ("w1", "w3")}, "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")}}


def conversion_pattern(model) -> str | None:
    """The MoE layout the model's type shares (transformers' conversion table), if it is one PEFT rewrites."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if CONVERSION_PATTERNS is None:  # an older transformers: experts are still nn.Linear, nothing to rewrite
        return None
    pattern = "mixtral" if model_type == "mixtral" else CONVERSION_PATTERNS.get(model_type)
    return pattern if pattern in RENAMED else None


def convert_moe_targets(model, config, all_linear_names) -> None:
    """Rewrite `config` in place as PEFT does for fused-MoE models (see the module docstring)."""
    pattern = conversion_pattern(model)
    if pattern is None or config.target_modules is None:
        return
    renamed = RENAMED[pattern]
    targets = config.target_modules
    if isinstance(targets, str):
        if targets.lower() != "all-linear":
            return  # a regex keeps its meaning on the new names
        targets = {n.rsplit(".", 1)[-1] for n in all_linear_names(model, config.task_type)} | set(renamed)
    parameters, remaining, matched = set(config.target_parameters or []), set(), {}
    for target in targets:
        old = next((o for o in renamed if target == o or target.endswith(f".{o}")), None)
        if old is None:
            remaining.add(target)
            continue
        parameters.add(renamed[old])
        matched.setdefault(renamed[old], set()).add(old)
    for new, olds in FUSED[pattern].items():
        present = matched.get(new, set())
        if 0 < len(present) < len(olds):
            raise ValueError(f"Cannot convert PEFT target(s) {', '.join(sorted(present))} without also targeting "
                             f"{', '.join(sorted(set(olds) - present))} because they are fused into {new}.")
        if len(present) == len(olds) > 1:
            config.rank_pattern[rf".*\.{new}"] = config.r * len(olds)
            config.alpha_pattern[rf".*\.{new}"] = config.lora_alpha * len(olds)
    config.target_parameters = sorted(parameters) or None
    config.target_modules = sorted(remaining)


_OLD_EXPERT_KEY = re.compile(r"^(?P<block>.*)\.(?P<moe>block_sparse_moe|mlp)\.experts\.(?P<expert>\d+)\."
                             r"(?P<layer>\w+)\.lora_(?P<factor>[AB])\.weight$")


def convert_old_expert_weights(model, state_dict: dict, key_prefix: str) -> dict:
    """An adapter file written for transformers 4's per-expert nn.Linear layers, rewritten for the fused 3-D
    parameters as PEFT 0.21 rewrites it: per layer, expert e's pair of the fused projections becomes rows
    [A_gate; A_up] of A and the block-diagonal diag(B_gate, B_up) of B (rank 2r, alpha 2·alpha in the config), the
    experts stacked in PEFT's order (A rows expert-major, B columns expert-minor); Mixtral's `block_sparse_moe` is
    `mlp` now. Keys start with `key_prefix` (PEFT's). Files without such keys come back unchanged."""
    pattern = conversion_pattern(model)
    if pattern is None or not any(_OLD_EXPERT_KEY.match(k) for k in state_dict):
        return state_dict
    renamed = RENAMED[pattern]
    fused = FUSED[pattern]
    wrappers = {}  # (unwrapped module name, parameter) -> the wrapper's module name
    for name, module in model.named_modules():
        if isinstance(module, LoraParameter):
            wrappers[(name.replace(".base_layer", ""), module.parameter_name)] = name
    grouped: dict = {}  # (block, new parameter) -> {expert: {old layer: {A/B: tensor}}}
    out = {}
    for key, tensor in state_dict.items():
        match = _OLD_EXPERT_KEY.match(key)
        if match is None or match["layer"] not in renamed:
            out[key.replace(".block_sparse_moe.", ".mlp.")] = tensor
            continue
        slot = grouped.setdefault((match["block"], renamed[match["layer"]]), {})
        slot.setdefault(int(match["expert"]), {}).setdefault(match["layer"], {})[match["factor"]] = tensor
    for (block, parameter), experts in grouped.items():
        olds = fused.get(parameter) or tuple(old for old, new in renamed.items() if new == parameter)
        A = torch.cat([torch.cat([experts[e][o]["A"] for o in olds]) for e in sorted(experts)])
        B = torch.stack([torch.block_diag(*[experts[e][o]["B"] for o in olds]) for e in sorted(experts)])
        B = B.permute(1, 2, 0).reshape(B.shape[1], -1)  # (out, rank, experts) -> column j·E + e
        module = f"{block}.mlp.experts"
        unwrapped = module.removeprefix(key_prefix)
        wrapper = wrappers.get((unwrapped, parameter))
        if wrapper is None:
            raise ValueError(f"the adapter file holds transformers-4 expert weights for {unwrapped}.{parameter}, "
                             "which this model's adapter config does not target")
        out[f"{key_prefix}{wrapper}.lora_A.weight"] = A
        out[f"{key_prefix}{wrapper}.lora_B.weight"] = B
    return out
