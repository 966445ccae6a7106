"""Everything the training loop needs before its first step: checks, data, model, optimizer, resume.

`prepare_run` refuses every combination it can before any model is loaded, then builds a `Run`:
the rows, the adapted model and the module the loop calls, the optimizer and schedule, and the
state to continue from (a checkpoint with `resume`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .. import calc
from ..adapters.model import LoraModel
from ..adapters.task_models import get_peft_model
from ..generation import answer_prompts
from ..hardware import compute_dtype_note, dtype_decision, resolve_bf16
from ..kernels.attention_dtype import attention_dtype_note, attention_in_fp32
from ..kernels.saved_activations import compressed_activations, resolve_saved_activations
from ..models.loading import load_model, load_tokenizer, resolve_model_dir
from ..quant.nf4 import layer_cache_bytes, quantize_model_nf4
from ..utils import atomic_path
from ..variants.lora_config import LoraConfig
from . import checkpoint as ckpt
from . import data as D
from . import distributed as dist_utils
from .config import TrainConfig
from .fast_paths import enable_fast_paths
from .loss import LOSSES
from .optimizer import build_optimizer, lr_lambda  # noqa: F401 (lr_lambda: tests, bench)
from .memory_check import check_fits, choose_checkpointing, choose_saved_activations, run_shape
from .grpo import GRPO
from .rewards import load_rewards
from .rows import load_rows
from .preference_loss import PreferenceLoss, precompute_reference


@dataclass
class Run:
    """One training run, set up: what the loop reads and updates."""

    cfg: TrainConfig
    env: dist_utils.Env
    log: Callable[..., None]
    tokenizer: Any
    train_rows: list
    val_rows: list
    total_steps: int
    adapter_config: LoraConfig
    model: LoraModel
    engine: torch.nn.Module                 # what the loop calls: the loss module or its DDP/FSDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[torch.nn.Parameter]
    keep_activations: Callable[[], Any]     # context for the forward: saved activations in their storage dtype
    after_step: Callable[[Any, int], Any] | None  # the form's per-step callback (AdaLoRA's rank allocator)
    checkpoints: bool                       # mid-run checkpoints (not under multi-process FSDP)
    grpo: GRPO | None = None                # method: grpo: rewards, rollouts and the update (grpo.py)
    nf4_cache_bytes: int = 0                # dense NF4 weights kept for backward (checkpointed QLoRA runs)
    keep_memory_gb: float | None = None     # freed heap is kept for reuse below this (memory_check.check_fits)
    settings: dict = field(default_factory=dict)  # what `auto` decided and measured (metrics.jsonl's first line)
    prompts: list[str] = field(default_factory=list)
    before: list[str] = field(default_factory=list)
    step: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def initial_dir(self) -> str:  # PiSSA/OLoRA factors at step 0, needed to save them as plain LoRA
        return os.path.join(self.cfg.output_dir, "adapter_init")


def check_run(cfg: TrainConfig, env: dist_utils.Env) -> None:
    """Refuse what depends on the launch (TrainConfig refused the rest when it was made), before anything loads."""
    if cfg.method == "grpo" and env.world_size > 1:
        raise ValueError("method: grpo runs in one process for now (each rank would sample its own groups); "
                         "launch it without torchrun")
    if cfg.resume and env.world_size > 1 and cfg.distributed == "fsdp":
        raise ValueError("--resume is not supported with distributed=fsdp; use ddp for resumable runs")
    finished = os.path.join(cfg.output_dir, "adapter", "adapter_config.json")
    if os.path.isfile(finished) and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(f"{cfg.output_dir} already holds a trained adapter ({os.path.dirname(finished)}); "
                              "pass --force (overwrite: true) to replace it, or --output_dir=DIR for a new run")


def resolve_run_settings(cfg: TrainConfig, env: dist_utils.Env,
                         model=None) -> tuple[TrainConfig, list[str], float | None, dict]:
    """The `auto` settings decided before anything is loaded or written (compute dtype by measurement, saved
    activations by memory) and the memory check; returns the decided config, the lines saying why, the memory to
    keep for reuse (None where the run was not sized) and the record of what was decided and measured (the first
    line of metrics.jsonl)."""
    settings = {"dtype_setting": cfg.bf16 if isinstance(cfg.bf16, str) else ("bf16" if cfg.bf16 else "fp32")}
    dtype_note = None
    if cfg.bf16 == "auto":  # measured by rank 0 only (ranks timing at once slow each other), taken by every rank
        decision = decided_by_rank_0(lambda: dtype_decision(env.device), env)
        dtype_note = compute_dtype_note(decision)
        settings["dtype_decision"] = decision
        cfg = dataclasses.replace(cfg, bf16=decision["compute_dtype"] == "bf16")
    cfg = dataclasses.replace(cfg, bf16=resolve_bf16(cfg.bf16, env.device))
    attention_note = None
    if cfg.attention_fp32 == "auto":  # bf16 CPU runs with padding-free rows: measured, like the dtype
        fp32 = False
        if cfg.bf16 and torch.device(env.device).type == "cpu" and cfg.fused_kernels and cfg.padding_free:
            attention_note, fp32 = decided_by_rank_0(attention_decision, env)
        cfg = dataclasses.replace(cfg, attention_fp32=fp32)
    model_dir = resolve_model_dir(cfg.model) if model is None and cfg.memory_check else None  # sized, not loaded
    checkpointing, layers, plan_note = choose_checkpointing(cfg, model_dir)
    cfg = dataclasses.replace(cfg, gradient_checkpointing=checkpointing, checkpoint_layers=layers)
    saved, saved_note = choose_saved_activations(cfg, model_dir)
    cfg = dataclasses.replace(cfg, saved_activations=saved)
    memory_line, keep_gb, predicted = check_memory(cfg, model_dir) if model_dir else (None, None, None)
    notes = [line for line in (dtype_note, attention_note, plan_note, memory_line, saved_note) if line]
    settings.update(compute_dtype="bf16" if cfg.bf16 else "fp32", attention_fp32=cfg.attention_fp32,
                    gradient_checkpointing=cfg.gradient_checkpointing, checkpoint_layers=cfg.checkpoint_layers,
                    saved_activations=cfg.saved_activations, predicted_peak_gb=predicted, notes=notes)
    return cfg, notes, keep_gb, settings


def decided_by_rank_0(decide, env: dist_utils.Env):
    """decide() run on rank 0 only, its result taken by every rank: measurements that ranks timing at once would
    slow (and could decide differently)."""
    return dist_utils.gather_objects(decide() if env.rank == 0 else None, env)[0]


def attention_decision() -> tuple[str, bool]:
    fp32 = attention_in_fp32()
    return attention_dtype_note(fp32), fp32


def check_memory(cfg: TrainConfig, model_dir: str) -> tuple[str | None, float | None, dict | None]:
    """The run's predicted peak memory against what is available, the memory to keep for reuse and the predicted
    components in GB (see memory_check.check_fits); all None where the model's config cannot be sized (not a
    decoder config the calculator knows)."""
    try:
        return check_fits(model_dir, run_shape(cfg), cfg.memory_limit_gb)
    except calc.ArchUnknown:
        return None, None, None


def build_base(cfg: TrainConfig, env: dist_utils.Env, dtype: torch.dtype, model=None, num_labels: int | None = None,
               lora_dropout: float = 0.0, log=print) -> torch.nn.Module:
    """The frozen base on the run's device: loaded (or the one handed in), quantized, fused, checkpointed."""
    base = model if model is not None else load_model(cfg.model, dtype=dtype, quantize=cfg.quantize,
                                                      attn_implementation=cfg.attn_implementation,
                                                      num_labels=num_labels, seq2seq=cfg.task == "seq2seq")
    if cfg.quantize is None:
        base.to(device=env.device, dtype=dtype)
    else:
        if model is not None:  # a model handed in unquantized
            quantize_model_nf4(base.to(dtype), compute_dtype=dtype)
        base.to(env.device)  # moves the 4-bit buffers as they are
    if cfg.fused_kernels:  # each where it is exact for this model (fast_paths.py), saying so
        log(enable_fast_paths(base, cfg.task, cfg.padding_free, lora_dropout,
                              attention_fp32=cfg.attention_fp32 is True and dtype == torch.bfloat16))
    if cfg.gradient_checkpointing:
        checkpoint_layers(base, cfg.checkpoint_layers)
    return base


def checkpoint_layers(base: torch.nn.Module, count: int | None) -> None:
    """Gradient checkpointing on the first `count` decoder layers (None: all). The others keep their activations
    for backward (no second forward)."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # transformers is loaded by now

    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers[count:] if count is not None else []:
        layer.gradient_checkpointing = False


def adapt(cfg: TrainConfig, base, adapter_config: LoraConfig, log) -> tuple[LoraModel, LoraConfig]:
    """The base with its trainable adapter: a new one as `cfg.lora` says, or `cfg.init_adapter`'s saved one (with
    its own settings), and the adapter config in force."""
    if not cfg.init_adapter:
        return get_peft_model(base, adapter_config), adapter_config
    peft_model = LoraModel.from_pretrained(base, cfg.init_adapter, is_trainable=True)
    adapter_config = peft_model.peft_config["default"]
    log(f"adapter: starting from {cfg.init_adapter} ({adapter_config.PEFT_TYPE}, r={adapter_config.r})")
    return peft_model, adapter_config


def prompts_per_step(cfg: TrainConfig) -> int:
    """GRPO: the prompts of one optimizer step (each sampled num_generations times)."""
    return cfg.batch_size * cfg.grad_accum // cfg.num_generations


def build_loss(cfg: TrainConfig, peft_model) -> torch.nn.Module:
    """The module the loop calls: the task's loss, or the preference loss of `cfg.method` (grpo: the model; its
    update is the GRPO object's)."""
    if cfg.method == "grpo":
        return peft_model
    if cfg.method == "sft":
        return LOSSES[cfg.task](peft_model, fused=cfg.fused_kernels)
    return PreferenceLoss(peft_model, cfg.method, beta=cfg.beta, loss_type=cfg.loss_type,
                          label_smoothing=cfg.label_smoothing, orpo_lambda=cfg.orpo_lambda, sft_weight=cfg.sft_weight,
                          fused=cfg.fused_kernels)


def resume(run: Run) -> None:
    """The checkpoint's step, history, trainable weights, optimizer, schedule, RNG and method state."""
    run.step, run.history, extra = ckpt.load(run.cfg.output_dir, run.model, run.optimizer, run.scheduler,
                                             run.env.rank)
    if run.grpo is not None:
        run.grpo.load_state(extra.get("grpo"))
    run.log(f"resumed from step {run.step}")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def prepare_run(cfg: TrainConfig, env: dist_utils.Env, model=None, tokenizer=None) -> Run:
    check_run(cfg, env)
    cfg, notes, keep_gb, settings = resolve_run_settings(cfg, env, model)  # before anything is written
    seed_everything(cfg.seed)
    is_main = env.rank == 0
    log = print if is_main else (lambda *a, **k: None)
    for line in notes:
        log(line)
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    train_rows, val_rows, classes = load_rows(cfg, tokenizer, log)  # a bad row stops the run before any file
    os.makedirs(cfg.output_dir, exist_ok=True)
    rows_per_micro, accum = (prompts_per_step(cfg), 1) if cfg.method == "grpo" else \
        (cfg.batch_size * env.world_size, cfg.grad_accum)
    D.check_one_batch(len(train_rows), rows_per_micro, cfg.packing)
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * (len(train_rows) // rows_per_micro) / accum))

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    stored_as = resolve_saved_activations(cfg.saved_activations, dtype)
    log(f"model: {cfg.model}; frozen weights in {cfg.quantize or ('bf16' if cfg.bf16 else 'fp32')} (adapters fp32; "
        f"saved activations {'bf16' if stored_as == torch.bfloat16 else 'fp32'}); processes: {env.world_size}; "
        f"device: {env.device}")
    adapter_config = cfg.lora_config(total_steps)
    base = build_base(cfg, env, dtype, model, num_labels=len(classes) if classes is not None else None,
                      lora_dropout=getattr(adapter_config, "lora_dropout", 0.0), log=log)
    if classes is not None:
        base.config.pad_token_id = tokenizer.pad_token_id  # the classifier reads each row's last real token
        if is_main:
            with atomic_path(os.path.join(cfg.output_dir, "labels.json")) as tmp, open(tmp, "w") as f:
                json.dump({"id2label": {i: name for i, name in enumerate(classes)}}, f, indent=2)
    peft_model, adapter_config = adapt(cfg, base, adapter_config, log)
    prompts = D.read_prompts(cfg.prompts) if is_main and cfg.prompts and cfg.task == "causal_lm" else []
    before = answer_prompts(peft_model, tokenizer, prompts, cfg.max_new_tokens)
    peft_model.train()
    loss_module = build_loss(cfg, peft_model)
    if cfg.method == "dpo" and (cfg.precompute_ref_logps or cfg.init_adapter):
        precompute_reference(loss_module, train_rows + val_rows, cfg.batch_size, tokenizer.pad_token_id, env.device,
                             adapter_on=bool(cfg.init_adapter), log=log)
    engine = dist_utils.wrap(loss_module, env, cfg.distributed)
    optimizer, scheduler, params = build_optimizer(cfg, peft_model, env.device, total_steps)  # after FSDP's wrap
    run = Run(cfg, env, log, tokenizer, train_rows, val_rows, total_steps, adapter_config, peft_model,
              engine=engine, optimizer=optimizer, scheduler=scheduler, params=params,
              keep_activations=(lambda: compressed_activations(stored_as)) if stored_as != dtype else nullcontext,
              after_step=peft_model.step_hook,  # the same per-step object model.update_and_allocate drives
              checkpoints=not (env.world_size > 1 and cfg.distributed == "fsdp"), prompts=prompts, before=before,
              nf4_cache_bytes=layer_cache_bytes(base, getattr(base.config, "num_hidden_layers", 1) or 1)
              if cfg.quantize and cfg.gradient_checkpointing else 0,
              keep_memory_gb=keep_gb, settings=settings,
              grpo=GRPO(cfg, peft_model, tokenizer, load_rewards(cfg.rewards), env.device)
              if cfg.method == "grpo" else None)
    if adapter_config.svd_init and is_main and not cfg.resume:
        peft_model.save_pretrained(run.initial_dir)
    if env.world_size > 1:  # each process its own dropout stream (the adapters were initialised alike above)
        torch.manual_seed(cfg.seed + 1 + env.rank)
    if cfg.resume:
        resume(run)
    if is_main:
        cfg.save_yaml(os.path.join(cfg.output_dir, "config.yaml"))
    return run
