"""The one training loop: single process, or DDP/FSDP when launched by torchrun.

`train` reads top to bottom: set up (train_setup.py) -> steps (eval, checkpoint) -> save adapter,
metrics, plot. Ctrl-C saves a checkpoint and returns; `resume=True` continues bit-exactly (same data
order, optimizer, scheduler and RNG states).
"""

from __future__ import annotations

import json
import os
import time

import torch

from . import checkpoint as ckpt
from . import data as D
from . import distributed as dist_utils
from .generation import answer_prompts
from .hardware import attention_backends, release_freed_memory
from .plot import plot_losses
from .train_config import TrainConfig
from .train_setup import Run, prepare_run
from .utils import progress_bar


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


def micro_batches(run: Run, step: int) -> tuple[list[dict], int]:
    """This process's micro-batches of optimizer step `step`, and their real (unpadded) token count."""
    cfg, env = run.cfg, run.env
    batches, tokens = [], 0
    for a in range(cfg.grad_accum):
        rows = batch_order(len(run.train_rows), step * cfg.grad_accum + a, cfg.batch_size * env.world_size, cfg.seed)
        mine = [run.train_rows[i] for i in rows[env.rank * cfg.batch_size:(env.rank + 1) * cfg.batch_size]]
        batches.append({k: v.to(env.device) for k, v in D.collate(mine, run.tokenizer.pad_token_id).items()})
        tokens += sum(len(row) for row in mine)
    return batches, tokens


def train(cfg: TrainConfig, model=None, tokenizer=None, on_step=None) -> dict:
    """Fine-tune a LoRA adapter as `cfg` says. Returns a summary dict (losses, paths, timings, model).

    `model` / `tokenizer` override loading `cfg.model`; `on_step(step, record)` runs after each
    optimizer step (raise KeyboardInterrupt there to stop with a checkpoint).

    >>> result = train(TrainConfig(max_steps=20, output_dir="runs/x"))  # doctest: +SKIP
    """
    env = dist_utils.setup(cfg.device)
    try:
        run = prepare_run(cfg, env, model, tokenizer)
        cfg, step, history, pad_id = run.cfg, run.step, run.history, run.tokenizer.pad_token_id
        metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        if step == 0 and run.val_rows:  # held-out loss of the untrained adapter (= the base model)
            history.append({"step": 0, "eval_loss": evaluate(run.engine, run.val_rows, cfg.batch_size, pad_id,
                                                             env.device)})
            _write_metrics(run, metrics_path, history[-1], mode="w")
        progress = progress_bar(run.total_steps, step, enabled=run.is_main and cfg.progress)
        started, tokens_seen, interrupted = time.perf_counter(), 0, False
        try:
            while step < run.total_steps:
                batches, tokens = micro_batches(run, step)
                tokens_seen += tokens
                # Normalise by the global number of target tokens so every setup sums to the same gradient.
                n_targets = dist_utils.all_reduce_sum(sum(count_targets(b) for b in batches), env)
                loss_sum = 0.0
                for i, batch in enumerate(batches):
                    with dist_utils.no_sync_unless_last(run.engine, i == len(batches) - 1):
                        with run.keep_activations(), attention_backends(env.device):
                            loss = run.engine(**batch)
                        objective = loss * env.world_size / n_targets
                        regularization = run.model.weighted_regularization()  # e.g. AdaLoRA's, once per step
                        if regularization is not None:
                            objective = objective + regularization / len(batches)
                        objective.backward()
                    loss_sum += loss.item()
                grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.clip_grad_norm)
                run.optimizer.step()
                run.scheduler.step()
                if run.after_step is not None:  # sees this step's gradients (AdaLoRA's importance scores)
                    run.after_step(run.model, step)
                run.optimizer.zero_grad(set_to_none=True)
                if cfg.trim_memory and (step + 1) % int(cfg.trim_memory) == 0:
                    release_freed_memory()
                step += 1
                train_loss = dist_utils.all_reduce_sum(loss_sum, env) / n_targets
                record = {"step": step, "train_loss": train_loss, "lr": run.scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm),
                          "tokens_per_s": tokens_seen * env.world_size / (time.perf_counter() - started)}
                if run.val_rows and (step % cfg.eval_every == 0 or step == run.total_steps):
                    record["eval_loss"] = evaluate(run.engine, run.val_rows, cfg.batch_size, pad_id, env.device)
                history.append(record)
                _write_metrics(run, metrics_path, record)
                progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                progress.update(1)
                if run.checkpoints and step % cfg.save_every == 0 and step < run.total_steps:
                    ckpt.save(cfg.output_dir, run.model, run.optimizer, run.scheduler, step, history, run.is_main)
                if on_step is not None:
                    on_step(step, record)
        except KeyboardInterrupt:
            interrupted = True
            if run.checkpoints:
                ckpt.save(cfg.output_dir, run.model, run.optimizer, run.scheduler, step, history, run.is_main)
                run.log(f"\ninterrupted: checkpoint saved at step {step}; continue with --resume")
            else:
                run.log(f"\ninterrupted at step {step} (no checkpoint under FSDP)")
        finally:
            progress.close()
        return _finish(run, step, interrupted, time.perf_counter() - started)
    finally:
        dist_utils.teardown(env)


def _write_metrics(run: Run, path: str, record: dict, mode: str = "a") -> None:
    if run.is_main:
        with open(path, mode) as f:
            f.write(json.dumps(record) + "\n")


def _finish(run: Run, step: int, interrupted: bool, seconds: float) -> dict:
    """Save the adapter and the loss plot (unless interrupted); the summary `train` returns."""
    if hasattr(run.engine, "unshard"):  # FSDP2: every rank gathers the full parameters before rank 0 saves
        run.engine.unshard()
    adapter_dir = os.path.join(run.cfg.output_dir, "adapter")
    summary = {"is_main": run.is_main, "steps": step, "total_steps": run.total_steps, "interrupted": interrupted,
               "history": run.history, "adapter_dir": adapter_dir, "seconds": seconds, "before": run.before,
               "model": run.model}
    if not interrupted:
        if run.is_main:  # PiSSA/OLoRA are saved as a plain LoRA on the original base (portable)
            run.model.save_pretrained(adapter_dir, path_initial_model_for_weight_conversion=run.initial_dir
                                      if run.adapter_config.svd_init else None)
            plot_losses(run.history, os.path.join(run.cfg.output_dir, "loss.png"))
        summary["after"] = answer_prompts(run.model, run.tokenizer, run.prompts, run.cfg.max_new_tokens)
        summary["prompts"] = run.prompts
    return summary
