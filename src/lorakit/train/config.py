"""TrainConfig: every training setting as plain values; YAML files and dotted CLI overrides map onto it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from ..hardware import check_device_setting
from ..kernels.saved_activations import resolve_saved_activations
from ..utils import atomic_path, check_positive_int
from ..variants.lora_config import LoraConfig
from ..variants.registry import CONFIG_TYPES, config_class
from .method_settings import check_method_settings

PACKAGE_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")  # lorakit/data
DEMO_DATA = os.path.join(PACKAGE_DATA, "demo_train.jsonl")
DEMO_PROMPTS = os.path.join(PACKAGE_DATA, "demo_prompts.txt")
DEMO_LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


# task -> the adapter config's task_type
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}
FLOAT_FIELDS = ("epochs", "lr", "weight_decay", "min_lr_ratio", "clip_grad_norm", "val_fraction", "beta",
                "label_smoothing", "orpo_lambda", "sft_weight", "temperature", "top_p", "epsilon")  # + optional ones
# beta / loss_type left null: the method's default (DPO's for dpo/orpo/sft, TRL GRPOTrainer's for grpo)
METHOD_DEFAULTS = {"dpo": {"beta": 0.1, "loss_type": "sigmoid"}, "grpo": {"beta": 0.0, "loss_type": "dapo"}}
# What each declared field type accepts, and how an error says it (checked before anything loads).
FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"),
    "str": ((str,), "a non-empty string"),
    "str | None": ((str, type(None)), "a string or null"),
    "bool": ((bool,), "true or false"),
    "dict[str, Any]": ((dict,), "a mapping of adapter settings (e.g. lora.r: 16)"),
    "float | None": ((int, float, type(None)), "a number or null"),
    "bool | str": ((bool, str), "true, false or a name"),
    "bool | int": ((bool, int), "true, false or an integer"),
    "int | None": ((int, type(None)), "an integer or null"),
    "list | None": ((list, type(None)), "a list or null"),
}


@dataclass
class TrainConfig:
    """Training settings. Defaults are the demo: the embedded model on the bundled data."""

    model: str = "smollm2-135m"
    data: str = DEMO_DATA
    eval_data: str | None = None          # None: hold out val_fraction of `data`
    prompts: str | None = "auto"          # held-out prompts answered before and after training; auto = the demo's
                                          # 10 prompts when training on the demo data, none for your own data
    output_dir: str = "runs/demo"
    lora: dict[str, Any] = field(default_factory=lambda: dict(DEMO_LORA))
    max_length: int = 256
    batch_size: int = 8                   # rows per micro-batch, per process
    grad_accum: int = 1
    epochs: float = 1.5                   # the demo: 33 steps, under 5 min on a 2-core AVX2 CPU
    max_steps: int = 0                    # > 0 overrides epochs
    lr: float = 6e-4                      # the demo: learns the house style, keeps more of what the base knew
    weight_decay: float = 0.0
    loraplus_lr_ratio: float | None = None  # LoRA+: B matrices at lr * ratio (e.g. 16); None = plain AdamW
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1             # cosine decays to lr * min_lr_ratio
    clip_grad_norm: float = 1.0
    bf16: bool | str = "auto"             # frozen base weights + compute in bf16, adapters/optimizer fp32;
                                          # auto = where this CPU/GPU has fast bf16 (AVX512-BF16, AMX, CUDA)
    attn_implementation: str | None = None  # transformers' attention ("sdpa" default, "eager": ~7 % faster on
                                            # CPU at ~200 tokens but +0.6 GB peak in bench/train_vs_peft.py)
    trim_memory: bool | int = 10          # glibc malloc_trim every N steps (true = 1, false = never): returns
                                          # fragmented free heap to the OS, only above the run's planned level
                                          # (memory_check's keep level; none when the run cannot be sized)
    freed_memory_slack_gb: float | None = 0.5  # return freed heap to the OS whenever resident memory grew this
                                               # much and is above the run's planned peak (glibc fragments under
                                               # training: a 1B QLoRA step's peak 5.1 GB -> ~2.5 GB); null = never
    saved_activations: str = "auto"       # dtype of activations kept for backward: auto = the compute dtype
                                          # (exact), bf16 for an fp32 run only where fp32 would not fit; bf16 | fp32
    quantize: str | None = None           # "nf4": frozen base in 4-bit NF4 (QLoRA)
    fused_kernels: bool = True            # chunked lm_head + cross-entropy on labelled rows, fused RMSNorm
                                          # and SwiGLU (fewer saved activations)
    group_projections: bool | str = "auto"  # q/k/v and gate/up as one matmul each (fused_kernels only); auto =
                                            # when the base computes in bf16 (fp32 weights stay memory-mapped
                                            # from the model cache, so grouping them would hold a second copy)
    padding_free: bool = True             # causal LM with fused_kernels: a batch's rows laid end to end without
                                          # padding, attention per row (kernels/varlen_attention.py)
    attention_fp32: bool | str = "auto"   # padding-free rows of a bf16 run: attention on inputs cast to fp32;
                                          # auto = where that measured faster on this CPU (kernels/attention_dtype.py)
    gradient_checkpointing: bool | str = "auto"  # recompute layers' forward in backward to save memory: auto =
                                          # as few layers as the memory check needs (none where the run fits);
                                          # true = every layer (or checkpoint_layers of them); false = none
    checkpoint_layers: int | None = None  # with gradient_checkpointing: true, recompute only the first N layers
    packing: bool = False
    train_on_prompt: bool = False
    val_fraction: float = 0.1
    eval_every: int = 10
    save_every: int = 25
    seed: int = 0
    max_new_tokens: int = 128             # answers to the prompts before and after (room for the signature)
    resume: bool = False
    overwrite: bool = False               # replace the finished run already in output_dir (`train --force`)
    memory_check: bool = True             # refuse, before loading, a run whose predicted peak memory
                                          # (lorakit calc's model of this run) exceeds what is available
    memory_limit_gb: float | None = None  # the memory that check allows (default: the machine's available)
    method: str = "sft"                   # sft (supervised) | dpo | orpo (preference pairs; see preference_loss.py)
                                          # | grpo (online RL from prompts and reward functions; see grpo.py)
    beta: float | None = None             # dpo: how far the adapter may move from the reference (TRL's beta,
                                          # default 0.1); grpo: weight of the KL to the adapter-off model (default 0)
    loss_type: str | None = None          # dpo: sigmoid (default) | ipo | hinge | robust;
                                          # grpo: dapo (default, as TRL) | grpo | dr_grpo | bnpo
    label_smoothing: float = 0.0          # dpo: cDPO's (sigmoid) / rDPO's (robust) label-flip probability, < 0.5
    sft_weight: float = 0.0               # dpo: + this x the chosen responses' NLL (RPO; TRL's loss_type [.., sft])
    orpo_lambda: float = 0.1              # orpo: weight of the odds-ratio term (TRL's beta for ORPO)
    precompute_ref_logps: bool = False    # dpo: reference log-probs once over the data before training, instead of
                                          # one adapter-off forward per step
    rewards: list | None = None           # grpo: reward functions, each a built-in name (format_match,
                                          # exact_answer, length_target), module.path:function, or a mapping
                                          # {name: ..., weight: ..., <option>: ...} (see rewards.py)
    num_generations: int = 8              # grpo: completions sampled per prompt (one group); batch_size x
                                          # grad_accum completions per step, so that many / this many prompts
    max_completion_length: int = 128      # grpo: tokens sampled per completion at most
    temperature: float = 1.0              # grpo: sampling temperature of rollouts (log-probs are scored at it too)
    top_p: float = 1.0                    # grpo: nucleus sampling of rollouts
    epsilon: float = 0.2                  # grpo: ratio clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None     # grpo: upper clip (DAPO's clip-higher); null = epsilon
    scale_rewards: str = "group"          # grpo: advantages divided by the group's reward std | batch | none
    use_bias_correction_kl: bool = True   # grpo: KL term x the ratio (unbiased for reused rollouts), as TRL
    num_iterations: int = 1               # grpo: optimizer steps per rollout batch (π_old = the sampling policy)
    init_adapter: str | None = None       # start from this adapter directory (lorakit train's or PEFT's), e.g. an
                                          # SFT adapter before DPO; DPO's reference is then that starting adapter
    task: str = "causal_lm"               # causal_lm (chat / text data), seq_cls ({"text", "label"} rows) or
                                          # seq2seq (an encoder-decoder model; {"input", "target"} rows)
    distributed: str = "ddp"              # under torchrun: "ddp" or "fsdp"
    device: str = "auto"                  # auto = the GPU when one is visible, else cpu; "cpu" | "cuda"
    progress: bool = True

    def _check_types(self) -> None:
        """Every setting has the type its field declares (a one-line error naming it otherwise)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed, wanted = FIELD_TYPES.get(f.type, ((object,), ""))
            wrong_bool = isinstance(value, bool) and bool not in allowed and (int in allowed or float in allowed)
            if not isinstance(value, allowed) or wrong_bool or (f.type == "str" and not value.strip()):
                raise ValueError(f"{f.name} must be {wanted}, got {value!r}")

    def __post_init__(self):
        self._check_types()
        for name, value in METHOD_DEFAULTS.get(self.method, METHOD_DEFAULTS["dpo"]).items():
            if getattr(self, name) is None:  # the method's default where none was given
                setattr(self, name, value)
        if self.prompts == "auto":  # the demo's prompts belong to the demo
            on_demo = os.path.abspath(self.data) == os.path.abspath(DEMO_DATA)
            self.prompts = DEMO_PROMPTS if on_demo else None
        for name in FLOAT_FIELDS:  # YAML 1.1 reads "1e-3" (no dot) as a string
            value = getattr(self, name)
            try:
                setattr(self, name, float(value))
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number, got {value!r}") from None
        for name in ("max_length", "batch_size", "grad_accum", "eval_every", "save_every", "max_new_tokens",
                     "max_completion_length", "num_iterations"):
            check_positive_int(name, getattr(self, name))
        if self.max_steps < 0 or self.epochs <= 0:
            raise ValueError(f"need max_steps >= 0 and epochs > 0, got max_steps={self.max_steps}, "
                             f"epochs={self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.loraplus_lr_ratio is not None and not (isinstance(self.loraplus_lr_ratio, (int, float))
                                                       and self.loraplus_lr_ratio > 0):
            raise ValueError(f"loraplus_lr_ratio must be a number > 0 or null, got {self.loraplus_lr_ratio!r}")
        if self.quantize not in (None, "nf4"):
            raise ValueError(f"quantize must be null or 'nf4', got {self.quantize!r}")
        check_device_setting(self.device)
        if self.task not in TASK_TYPES:
            raise ValueError(f"task must be one of {sorted(TASK_TYPES)}, got {self.task!r}")
        if self.task != "causal_lm" and (self.packing or self.quantize):
            raise ValueError(f"task: {self.task} trains without packing and on an unquantized base (packing / "
                             "quantize apply to causal_lm)")
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"distributed must be 'ddp' or 'fsdp', got {self.distributed!r}")
        if self.freed_memory_slack_gb is not None and not self.freed_memory_slack_gb > 0:
            raise ValueError(f"freed_memory_slack_gb must be a number > 0 or null, got {self.freed_memory_slack_gb!r}")
        if not (isinstance(self.trim_memory, int) and self.trim_memory >= 0):
            raise ValueError(f"trim_memory must be true, false or a step interval >= 1, got {self.trim_memory!r}")
        resolve_saved_activations(self.saved_activations, torch.float32)  # raises on a bad setting
        if self.checkpoint_layers is not None and (isinstance(self.checkpoint_layers, bool)
                                                   or self.checkpoint_layers < 0):
            raise ValueError(f"checkpoint_layers must be an integer >= 0 or null, got {self.checkpoint_layers!r}")
        for name in ("bf16", "group_projections", "gradient_checkpointing", "attention_fp32"):
            if getattr(self, name) not in (True, False, "auto"):
                raise ValueError(f"{name} must be true, false or 'auto', got {getattr(self, name)!r}")
        check_method_settings(self)
        adapter = self.lora_config()  # validates the adapter settings now, not after the model loads
        if self.resume and not adapter.resumable:
            raise ValueError(f"--resume is not supported for {adapter.PEFT_TYPE} runs (its training state is not "
                             "checkpointed)")
        if self.quantize and adapter.svd_init:
            raise ValueError(f"init_lora_weights={adapter.init_lora_weights!r} rewrites the base weight, which "
                             f"quantize={self.quantize!r} stores in 4 bits; use init_lora_weights=true with QLoRA")

    def lora_config(self, total_steps: int | None = None) -> LoraConfig:
        """The adapter config; `lora.peft_type` picks LORA (default), VERA or ADALORA. AdaLoRA's
        total_step defaults to the run's number of optimizer steps."""
        settings = {"task_type": TASK_TYPES[self.task], **self.lora}
        config_type = config_class(settings.get("peft_type", "LORA"))
        return config_type(**config_type.run_settings(settings, total_steps))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str) -> None:
        """The run's settings, reusable as a config file: one-time actions (resume, overwrite) are not kept."""
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            yaml.safe_dump({**self.to_dict(), "resume": False, "overwrite": False}, f, sort_keys=False)


def yaml_error(source: str, e: yaml.YAMLError) -> ValueError:
    """One line: where (line, column) and what, instead of PyYAML's multi-line report."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return ValueError(f"{source}: invalid YAML{where}: {what}")


def _parse_value(text: str, item: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise yaml_error(f"override {item!r}", e) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--key=value` / `--lora.r=32` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ValueError(f"override {item!r} must look like --key=value (e.g. --lora.r=32)")
        key, _, raw = item[2:].partition("=")
        node = data
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(raw, item)
    return data


def load_train_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- dotted overrides. Unknown keys are errors that list the known ones."""
    data: dict[str, Any] = {}
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} does not exist")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise yaml_error(path, e) from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known settings: {sorted(known)}")
    lora = dict(DEMO_LORA)
    given = data.pop("lora", None) or {}
    if not isinstance(given, dict):
        raise ValueError(f"lora must be a mapping of adapter settings (e.g. --lora.r=16), got {given!r}")
    lora.update(given)
    lora_known = {f.name for cls in CONFIG_TYPES.values() for f in dataclasses.fields(cls)}
    bad = sorted(set(lora) - lora_known)
    if bad:
        raise ValueError(f"unknown lora setting(s) {bad}; known: {sorted(lora_known - {'extra_fields'})}")
    if path:  # relative paths in a config file are relative to the file
        base = os.path.dirname(os.path.abspath(path))
        for key in ("data", "eval_data", "prompts", "init_adapter"):
            if isinstance(data.get(key), str) and not os.path.isabs(data[key]):
                candidate = os.path.join(base, data[key])
                data[key] = candidate if os.path.exists(candidate) else data[key]
    return TrainConfig(lora=lora, **data)
