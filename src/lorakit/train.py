"""The one training loop: single process, or DDP/FSDP when launched by torchrun.

Read top to bottom: set up -> data -> model -> optimizer -> resume -> steps (eval, checkpoint)
-> save adapter, metrics, plot. Ctrl-C saves a checkpoint and returns; `resume=True` continues
bit-exactly (same data order, optimizer, scheduler and RNG states).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from contextlib import nullcontext

import numpy as np
import torch

from . import checkpoint as ckpt
from . import data as D
from . import distributed as dist_utils
from .hardware import attention_backends, release_freed_memory, resolve_bf16
from .kernels.rms_norm import fuse_rms_norms
from .kernels.saved_activations import compressed_activations, resolve_saved_activations
from .kernels.swiglu import fuse_swiglu_mlps
from .loss import CausalLMLoss
from .model import get_peft_model
from .models import load_model, load_tokenizer
from .quant.nf4 import quantize_model_nf4
from .train_config import TrainConfig
from .variants import create_loraplus_optimizer
from .variants.adalora import RankAllocator


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def count_targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != D.IGNORE).sum())


def batch_order(n_rows: int, micro_index: int, rows_per_micro: int, seed: int) -> list[int]:
    """Row indices of global micro-batch `micro_index`: a fresh seeded shuffle every epoch."""
    per_epoch = max(1, n_rows // rows_per_micro)
    epoch, k = divmod(micro_index, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[k * rows_per_micro:(k + 1) * rows_per_micro]


@torch.no_grad()
def evaluate(loss_module, examples, batch_size: int, pad_id: int, device) -> float:
    """Mean token loss (nats) over `examples`. `loss_module(**batch)` returns a loss sum: a
    CausalLMLoss, or the DDP/FSDP engine wrapping one (so sharded parameters are gathered)."""
    was_training = loss_module.training
    loss_module.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in D.collate(examples[i:i + batch_size], pad_id).items()}
        with attention_backends(device):
            total += loss_module(**batch).item()
        count += count_targets(batch)
    loss_module.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def answer_prompts(model, tokenizer, prompts: list[str], max_new_tokens: int, device) -> list[str]:
    """Greedy answers to each prompt, as a chat turn."""
    was_training = model.training
    model.eval()
    answers = []
    for prompt in prompts:
        text = D.render_prompt([{"role": "user", "content": prompt}], tokenizer)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def _read_prompts(path: str | None) -> list[str]:
    if not path:
        return []
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def train(cfg: TrainConfig, model=None, tokenizer=None, on_step=None) -> dict:
    """Fine-tune a LoRA adapter as `cfg` says. Returns a summary dict (losses, paths, timings, model).

    `model` / `tokenizer` override loading `cfg.model`; `on_step(step, record)` runs after each
    optimizer step (raise KeyboardInterrupt there to stop with a checkpoint).

    >>> result = train(TrainConfig(max_steps=20, output_dir="runs/x"))  # doctest: +SKIP
    """
    env = dist_utils.setup(cfg.device)
    is_main = env.rank == 0
    cfg = dataclasses.replace(cfg, bf16=resolve_bf16(cfg.bf16, env.device))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)
    log = print if is_main else (lambda *a, **k: None)

    tokenizer = tokenizer or load_tokenizer(cfg.model)
    examples, stats = D.load_examples(cfg.data, tokenizer, cfg.max_length, cfg.train_on_prompt)
    if cfg.eval_data:
        train_rows, val_rows = examples, D.load_examples(cfg.eval_data, tokenizer, cfg.max_length)[0]
    else:
        train_rows, val_rows = D.split(examples, cfg.val_fraction, cfg.seed)
    if cfg.packing:
        train_rows = D.pack(train_rows, cfg.max_length)
    log(f"data: {stats.rows} rows from {cfg.data} ({stats.truncated} truncated to {cfg.max_length} tokens, "
        f"{stats.dropped_empty} dropped with no response tokens); {len(train_rows)} train / {len(val_rows)} val")

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    stored_as = resolve_saved_activations(cfg.saved_activations, dtype)
    log(f"model: {cfg.model}; frozen weights in {cfg.quantize or ('bf16' if cfg.bf16 else 'fp32')} (adapters fp32; "
        f"saved activations {'bf16' if stored_as == torch.bfloat16 else 'fp32'}); processes: {env.world_size}; "
        f"device: {env.device}")
    rows_per_micro = cfg.batch_size * env.world_size
    if len(train_rows) < rows_per_micro:
        raise ValueError(f"{len(train_rows)} training rows is fewer than one batch of {rows_per_micro} rows")
    micro_per_epoch = len(train_rows) // rows_per_micro
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * micro_per_epoch / cfg.grad_accum))

    base = model if model is not None else load_model(cfg.model, dtype=dtype, quantize=cfg.quantize,
                                                      attn_implementation=cfg.attn_implementation)
    if cfg.quantize is None:
        base.to(device=env.device, dtype=dtype)
    else:
        if model is not None:  # a model handed in unquantized
            quantize_model_nf4(base.to(dtype), compute_dtype=dtype)
        base.to(env.device)  # moves the 4-bit buffers as they are
    if cfg.fused_kernels:
        fuse_rms_norms(base)
        fuse_swiglu_mlps(base)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapter_config = cfg.lora_config(total_steps)
    peft_model = get_peft_model(base, adapter_config)
    allocator = RankAllocator(peft_model, "default") if adapter_config.adapter_kind == "adalora" else None
    prompts = _read_prompts(cfg.prompts) if is_main else []
    before = answer_prompts(peft_model, tokenizer, prompts, cfg.max_new_tokens, env.device) if prompts else []
    peft_model.train()
    engine = dist_utils.wrap(CausalLMLoss(peft_model, fused=cfg.fused_kernels), env, cfg.distributed)
    keep_activations = (lambda: compressed_activations(stored_as)) if stored_as != dtype else nullcontext
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if cfg.loraplus_lr_ratio:
        optimizer = create_loraplus_optimizer(peft_model, cfg.lr, cfg.loraplus_lr_ratio,
                                              weight_decay=cfg.weight_decay)
    else:
        # on CUDA one fused kernel updates every adapter (foreach: a few launches per tensor group)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      fused=True if env.device.type == "cuda" else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio))

    step, history = 0, []
    # FSDP shards optimizer states too; mid-run checkpoints are written for single-process and DDP runs.
    checkpoints = not (env.world_size > 1 and cfg.distributed == "fsdp")
    if cfg.resume and allocator is not None:
        raise ValueError("--resume is not supported for AdaLoRA runs (its importance scores are not checkpointed)")
    initial_dir = os.path.join(cfg.output_dir, "adapter_init")
    if adapter_config.svd_init and is_main and not cfg.resume:
        peft_model.save_pretrained(initial_dir)  # PiSSA/OLoRA factors at step 0: needed to convert to plain LoRA
    if cfg.resume and not checkpoints:
        raise ValueError("--resume is not supported with distributed=fsdp; use ddp for resumable runs")
    if cfg.resume:
        step, history = ckpt.load(cfg.output_dir, peft_model, optimizer, scheduler)
        log(f"resumed from step {step}")
    if is_main:
        cfg.save_yaml(os.path.join(cfg.output_dir, "config.yaml"))
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    pad_id = tokenizer.pad_token_id

    if step == 0 and val_rows:  # held-out loss of the untrained adapter (= the base model)
        history.append({"step": 0, "eval_loss": evaluate(engine, val_rows, cfg.batch_size, pad_id, env.device)})
        if is_main:
            with open(metrics_path, "w") as f:
                f.write(json.dumps(history[-1]) + "\n")
    progress = dist_utils.progress_bar(total_steps, step, enabled=is_main and cfg.progress)
    started, tokens_seen, interrupted = time.perf_counter(), 0, False
    try:
        while step < total_steps:
            micro_batches = []
            for a in range(cfg.grad_accum):
                rows = batch_order(len(train_rows), step * cfg.grad_accum + a, rows_per_micro, cfg.seed)
                mine = rows[env.rank * cfg.batch_size:(env.rank + 1) * cfg.batch_size]
                micro_batches.append({k: v.to(env.device) for k, v in
                                      D.collate([train_rows[i] for i in mine], pad_id).items()})
                tokens_seen += sum(len(train_rows[i]) for i in mine)  # real tokens, no padding
            # Normalise by the global number of target tokens so every setup sums to the same gradient.
            n_targets = dist_utils.all_reduce_sum(sum(count_targets(b) for b in micro_batches), env)
            loss_sum = 0.0
            for i, batch in enumerate(micro_batches):
                with dist_utils.no_sync_unless_last(engine, i == len(micro_batches) - 1):
                    with keep_activations(), attention_backends(env.device):
                        loss = engine(**batch)
                    objective = loss * env.world_size / n_targets
                    if allocator is not None:  # AdaLoRA's orthogonality regulariser, once per optimizer step
                        objective = objective + (adapter_config.orth_reg_weight / len(micro_batches)
                                                 * peft_model.regularization_loss())
                    objective.backward()
                loss_sum += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            if allocator is not None:  # AdaLoRA: importance scores and rank budget, before grads are cleared
                allocator.update_and_allocate(peft_model, step)
            optimizer.zero_grad(set_to_none=True)
            if cfg.trim_memory and (step + 1) % int(cfg.trim_memory) == 0:
                release_freed_memory()
            step += 1
            train_loss = dist_utils.all_reduce_sum(loss_sum, env) / n_targets
            elapsed = time.perf_counter() - started
            record = {"step": step, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "tokens_per_s": tokens_seen * env.world_size / elapsed}
            if val_rows and (step % cfg.eval_every == 0 or step == total_steps):
                record["eval_loss"] = evaluate(engine, val_rows, cfg.batch_size, pad_id, env.device)
            history.append(record)
            if is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                progress.update(1)
            if checkpoints and step % cfg.save_every == 0 and step < total_steps:
                ckpt.save(cfg.output_dir, peft_model, optimizer, scheduler, step, history, is_main)
            if on_step is not None:
                on_step(step, record)
    except KeyboardInterrupt:
        interrupted = True
        if checkpoints:
            ckpt.save(cfg.output_dir, peft_model, optimizer, scheduler, step, history, is_main)
            log(f"\ninterrupted: checkpoint saved at step {step}; continue with --resume")
        else:
            log(f"\ninterrupted at step {step} (no checkpoint under FSDP)")
    finally:
        progress.close()

    if hasattr(engine, "unshard"):  # FSDP2: every rank gathers the full parameters before rank 0 saves
        engine.unshard()
    adapter_dir = os.path.join(cfg.output_dir, "adapter")
    summary = {"is_main": is_main, "steps": step, "total_steps": total_steps, "interrupted": interrupted, "history": history,
               "adapter_dir": adapter_dir, "seconds": time.perf_counter() - started, "before": before}
    if not interrupted:
        if is_main:  # PiSSA/OLoRA are saved as a plain LoRA on the original base (portable)
            peft_model.save_pretrained(adapter_dir, path_initial_model_for_weight_conversion=initial_dir
                                       if adapter_config.svd_init else None)
            from .plot import plot_losses

            plot_losses(history, os.path.join(cfg.output_dir, "loss.png"))
        summary["after"] = answer_prompts(peft_model, tokenizer, prompts, cfg.max_new_tokens, env.device) \
            if prompts else []
        summary["prompts"] = prompts
    summary["model"] = peft_model
    dist_utils.teardown(env)
    return summary
