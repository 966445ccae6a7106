"""The one training loop: single process, or DDP/FSDP when launched by torchrun.

`train` reads top to bottom: set up (setup.py) -> steps (eval, checkpoint) -> save adapter,
metrics, plot. Ctrl-C saves a checkpoint and returns; `resume=True` continues bit-exactly (same data
order, optimizer, scheduler and RNG states).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext

import torch

from ..generation import answer_prompts
from ..hardware import FreedMemoryCap, attention_backends, peak_resident_gb, release_freed_memory
from ..quant.nf4 import nf4_weight_cache
from ..utils import atomic_path, eval_mode, progress_bar
from . import checkpoint as ckpt
from . import data as D
from . import distributed as dist_utils
from .config import TrainConfig
from .plot import plot_losses
from .preference_data import collate_pairs
from .projection_groups import grouped_projections
from .setup import Run, prepare_run, prompts_per_step
from .stop_request import StopRequest


def loss_module_of(engine) -> torch.nn.Module:
    """The loss module the loop calls, unwrapped from its DDP wrapper when there is one."""
    return getattr(engine, "module", engine)


def count_targets(engine, batch: dict) -> int:
    """What the loss sums over in `batch` (target tokens; rows for classification; pairs); `engine` is the loss
    module or its DDP wrapper."""
    return loss_module_of(engine).count_targets(batch)


def batch_order(n_rows: int, micro_index: int, rows_per_micro: int, seed: int) -> list[int]:
    """Row indices of global micro-batch `micro_index`: a fresh seeded shuffle every epoch."""
    per_epoch = max(1, n_rows // rows_per_micro)
    epoch, k = divmod(micro_index, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[k * rows_per_micro:(k + 1) * rows_per_micro]


def collate_for(cfg: TrainConfig):
    """Rows -> a batch: preference pairs (2n rows) for dpo/orpo, else the task's rows."""
    return collate_pairs if cfg.method != "sft" else D.collate


def take_metrics(engine) -> dict[str, float]:
    """The loss module's metric sums since the last call (the preference metrics), else nothing."""
    take = getattr(loss_module_of(engine), "take_metrics", None)
    return take() if take is not None else {}


@torch.no_grad()
def evaluate(loss_module, examples, batch_size: int, pad_id: int, device, collate=D.collate) -> float:
    """Mean loss over `examples` (nats per target token; per pair for preference losses). `loss_module(**batch)`
    returns a loss sum: a CausalLMLoss, or the DDP/FSDP engine wrapping one (so sharded parameters are gathered)."""
    total, count = 0.0, 0
    with eval_mode(loss_module):
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
            with attention_backends(device):
                total += loss_module(**batch).item()
            count += count_targets(loss_module, batch)
    return total / max(1, count)


def micro_batches(run: Run, step: int) -> tuple[list[dict], int]:
    """This process's micro-batches of optimizer step `step`, and their real (unpadded) token count."""
    cfg, env = run.cfg, run.env
    batches, tokens = [], 0
    for a in range(cfg.grad_accum):
        rows = batch_order(len(run.train_rows), step * cfg.grad_accum + a, cfg.batch_size * env.world_size, cfg.seed)
        mine = [run.train_rows[i] for i in rows[env.rank * cfg.batch_size:(env.rank + 1) * cfg.batch_size]]
        batches.append({k: v.to(env.device) for k, v in collate_for(cfg)(mine, run.tokenizer.pad_token_id).items()})
        tokens += sum(len(row) for row in mine)
    return batches, tokens


def optimizer_step(run: Run, step: int) -> tuple[float, float, int, dict]:
    """Optimizer step `step`: forward/backward over its micro-batches, clip, update, the form's per-step work.
    Returns (mean train loss per target, gradient norm, this process's tokens, the loss module's metrics as means
    over the step's targets: rewards and log-probs of preference pairs)."""
    env = run.env
    batches, tokens = micro_batches(run, step)
    # Normalise by the global number of target tokens so every setup sums to the same gradient.
    n_targets = dist_utils.all_reduce_sum(sum(count_targets(run.engine, b) for b in batches), env)
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
    grad_norm = apply_update(run, step)
    metrics = {name: dist_utils.all_reduce_sum(value, env) / n_targets for name, value in
               sorted(take_metrics(run.engine).items())}  # sorted: every process reduces in the same order
    return dist_utils.all_reduce_sum(loss_sum, env) / n_targets, grad_norm, tokens, metrics


def apply_update(run: Run, step: int) -> float:
    """The end of every optimizer step, whatever the method: clip, update, the form's per-step work, free
    gradients; returns the gradient norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, run.cfg.clip_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    if run.after_step is not None:  # sees this step's gradients (AdaLoRA's importance scores)
        run.after_step(run.model, step)
    run.optimizer.zero_grad(set_to_none=True)
    if run.cfg.trim_memory and (step + 1) % int(run.cfg.trim_memory) == 0:
        release_freed_memory(run.keep_memory_gb)
    return float(grad_norm)


def grpo_step(run: Run, step: int) -> tuple[float, float, int, dict]:
    """A GRPO optimizer step: new rollouts every num_iterations steps (the prompts of generation k in a seeded
    shuffle, as the SFT rows are), then forward/backward over their micro-batches. Same returns as optimizer_step;
    the metrics are TRL's (means over the step's completions or completion tokens)."""
    cfg, grpo = run.cfg, run.grpo
    started, rollout_s = time.perf_counter(), 0.0
    if step % cfg.num_iterations == 0 or grpo.rollouts is None:
        generation = step // cfg.num_iterations
        rows = batch_order(len(run.train_rows), generation, prompts_per_step(cfg), cfg.seed)
        grpo.generate([run.train_rows[i] for i in rows], step)
        rollout_s = time.perf_counter() - started
    step_tokens = grpo.completion_tokens()
    loss_sum, sums = 0.0, {}
    for items in grpo.rollouts:
        with run.keep_activations(), attention_backends(run.env.device):
            loss, batch_sums = grpo.micro_batch_loss(items, step_tokens)
        regularization = run.model.weighted_regularization()
        if regularization is not None:
            loss = loss + regularization / len(grpo.rollouts)
        loss.backward()
        loss_sum += loss.item()
        for name, value in batch_sums.items():
            sums[name] = sums.get(name, 0.0) + value
    grad_norm = apply_update(run, step)
    tokens = sums.pop("tokens")
    metrics = {**grpo.rollout_metrics, **{name: value / max(tokens, 1.0) for name, value in sorted(sums.items())},
               "rollout_s": rollout_s, "update_s": time.perf_counter() - started - rollout_s}
    return loss_sum, grad_norm, grpo.step_tokens(), metrics


def eval_record(run: Run) -> dict:
    """eval_loss over the held-out rows, with the loss module's metrics as eval_<name> (TRL's names); for grpo the
    held-out prompts' rewards (greedy completions)."""
    if run.grpo is not None:
        return run.grpo.evaluate(run.val_rows)
    loss = evaluate(run.engine, run.val_rows, run.cfg.batch_size, run.tokenizer.pad_token_id, run.env.device,
                    collate_for(run.cfg))
    count = len(run.val_rows)  # preference metrics are sums over pairs, one pair per held-out row
    return {"eval_loss": loss, **{f"eval_{name}": value / count for name, value in take_metrics(run.engine).items()}}


def train(cfg: TrainConfig, model=None, tokenizer=None, on_step=None) -> dict:
    """Fine-tune a LoRA adapter as `cfg` says. Returns a summary dict (losses, paths, timings, model).

    `model` / `tokenizer` override loading `cfg.model`; `on_step(step, record)` runs after each
    optimizer step (raise KeyboardInterrupt there to stop with a checkpoint).

    >>> result = train(TrainConfig(max_steps=20, output_dir="runs/x"))  # doctest: +SKIP
    """
    env = dist_utils.setup(cfg.device)
    try:
        run = prepare_run(cfg, env, model, tokenizer)
        cfg, step, history = run.cfg, run.step, run.history
        metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        # first line: what `auto` decided and measured (no "step": charts and step counts skip it); a resumed run
        # rewrites the file (the metrics of steps after its checkpoint are redone) under its own decisions
        _write_metrics(run, metrics_path, {"settings": run.settings}, mode="w")
        for record in history:
            _write_metrics(run, metrics_path, record)
        if step == 0 and run.val_rows:  # held-out loss of the untrained adapter (= the base model)
            history.append({"step": 0, **eval_record(run)})
            _write_metrics(run, metrics_path, history[-1])
        progress = progress_bar(run.total_steps, step, enabled=run.is_main and cfg.progress)
        started, tokens_seen, interrupted, at_step_boundary = time.perf_counter(), 0, False, True
        grouping = group_projections_enabled(cfg, env)
        memory_cap = (FreedMemoryCap(cfg.freed_memory_slack_gb, keep_gb=run.keep_memory_gb)
                      if cfg.freed_memory_slack_gb else nullcontext())
        with StopRequest(run.log) as stop, grouped_projections(run.model, enabled=grouping), memory_cap, \
                nf4_weight_cache(run.nf4_cache_bytes):
            try:
                while step < run.total_steps:
                    at_step_boundary = False
                    train_loss, grad_norm, tokens, metrics = (grpo_step if run.grpo else optimizer_step)(run, step)
                    step, tokens_seen, at_step_boundary = step + 1, tokens_seen + tokens, True
                    elapsed = time.perf_counter() - started
                    record = {"step": step, "train_loss": train_loss, "lr": run.scheduler.get_last_lr()[0],
                              "grad_norm": grad_norm, "tokens_per_s": tokens_seen * env.world_size / elapsed,
                              "elapsed_s": elapsed, "peak_memory_gb": peak_memory_gb(env.device), **metrics}
                    if run.val_rows and (step % cfg.eval_every == 0 or step == run.total_steps):
                        record.update(eval_record(run))
                    history.append(record)
                    _write_metrics(run, metrics_path, record)
                    progress.set_postfix(loss=f"{train_loss:.3f}", **postfix(record))
                    progress.update(1)
                    if run.checkpoints and step % cfg.save_every == 0 and step < run.total_steps:
                        save_checkpoint(run, step)
                    if on_step is not None:
                        on_step(step, record)
                    if dist_utils.all_reduce_sum(float(stop.requested), env) > 0 and step < run.total_steps:
                        raise KeyboardInterrupt  # every process stops after the same step
            except KeyboardInterrupt:
                interrupted = True
                _save_on_interrupt(run, step, at_step_boundary)
            finally:
                progress.close()
        summary = _finish(run, step, interrupted, time.perf_counter() - started)
        dist_utils.leave_together(env)
        return summary
    finally:
        dist_utils.teardown(env)


def peak_memory_gb(device) -> float:
    """The run's memory high-water mark so far: this process's peak resident memory on a CPU, the peak of
    allocated GPU memory on CUDA (GB)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_resident_gb()


def postfix(record: dict) -> dict[str, str]:
    """The progress bar's figures besides the loss: reward accuracy for preference runs, tokens/s."""
    shown = {"acc": f"{record['rewards/accuracies']:.2f}"} if "rewards/accuracies" in record else {}
    if "reward" in record:
        shown["reward"] = f"{record['reward']:.2f}"
    return {**shown, "tok_s": f"{record['tokens_per_s']:.0f}"}


def group_projections_enabled(cfg: TrainConfig, env) -> bool:
    """q/k/v and gate/up as one matmul each while training: with the fused kernels, not under FSDP (which
    shards each weight itself); `auto` = where the base computes in bf16 (cfg.bf16 is resolved by now). On an
    fp32 base loaded from the cache the weights stay memory-mapped, so their concatenation is a second copy
    (measured on an AVX2 EPYC: +0.28 GB of 1.9 GB and no speed change)."""
    if not cfg.fused_kernels or (env.world_size > 1 and cfg.distributed == "fsdp"):
        return False
    return bool(cfg.bf16) if cfg.group_projections == "auto" else bool(cfg.group_projections)


def save_checkpoint(run: Run, step: int) -> None:
    extra = {"grpo": run.grpo.state()} if run.grpo is not None else None
    ckpt.save(run.cfg.output_dir, run.model, run.optimizer, run.scheduler, step, run.history, run.env, extra)


def _save_on_interrupt(run: Run, step: int, at_step_boundary: bool) -> None:
    if not run.checkpoints:
        run.log(f"\ninterrupted at step {step} (no checkpoint under FSDP)")
    elif not at_step_boundary:  # mid-step: parameters, optimizer and RNG belong to no single step
        run.log(f"\ninterrupted during step {step + 1}: no checkpoint written (the last one, if any, is kept); "
                "continue with --resume from it")
    else:
        save_checkpoint(run, step)
        run.log(f"\ninterrupted: checkpoint saved at step {step}; continue with --resume")


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
               "model": run.model, "settings": run.settings, "device": torch.device(run.env.device).type,
               "peak_memory_gb": peak_memory_gb(run.env.device)}
    if not interrupted:
        if run.is_main:  # PiSSA/OLoRA are saved as a plain LoRA on the original base (portable)
            with atomic_path(adapter_dir, directory=True) as tmp:  # the whole adapter/ or the previous one
                run.model.save_pretrained(tmp, path_initial_model_for_weight_conversion=run.initial_dir
                                          if run.adapter_config.svd_init else None)
            plot_losses(run.history, os.path.join(run.cfg.output_dir, "loss.png"))
            ckpt.remove(run.cfg.output_dir)  # finished: a later --resume must not retrain from a stale step
        summary["after"] = answer_prompts(run.model, run.tokenizer, run.prompts, run.cfg.max_new_tokens)
        summary["prompts"] = run.prompts
    return summary
