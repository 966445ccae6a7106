"""GRPO (`method: grpo`): prompts -> rollouts with the live adapter -> rewards -> one optimizer step.

Each optimizer step takes batch_size x grad_accum completions: batch_size x grad_accum / num_generations prompts,
each sampled num_generations times through `model.generate` on the adapted model (KV cache, all rows of the step
in one batch, adapter live: no merge, no second model). A step's rollouts are reused for `num_iterations`
consecutive steps (π_old = the policy that sampled them, as in TRL); the rollouts in use are part of the
checkpoint, so a resumed run continues bit for bit. The reference policy for the KL term is the same model with
its adapter switched off. Metrics use TRL's names (reward, reward_std, rewards/<fn>/mean, kl, entropy,
clip_ratio/*, completions/*, frac_reward_zero_std). The arithmetic is in grpo_loss.py, rewards in rewards.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..chat import check_messages, render_prompt
from ..generation import left_padded, pad_token_id
from ..hardware import attention_backends
from ..utils import eval_mode
from . import grpo_loss as G
from .data import DataError, DataStats, read_rows, right_pad
from .loss import fused_head_supported
from .preference_loss import decoder_hidden
from .rewards import Reward, score

GENERATION_BATCH = 64  # rows generated at once


@dataclass
class PromptExample:
    prompt: Any                   # the row's prompt as given (text, or a list of messages)
    prompt_ids: list[int]
    columns: dict[str, Any] = field(default_factory=dict)  # the row's other fields, for reward functions

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclass
class Completion:
    """One sampled completion of a step, with what its update needs."""

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float = 0.0
    old_logps: torch.Tensor | None = None   # π_old per token (num_iterations > 1)
    ref_logps: torch.Tensor | None = None   # reference per token (beta != 0)


def prompt_of(row) -> Any:
    """A row's prompt: `prompt` (text or messages) or `messages`; a ValueError saying what is wrong otherwise."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("empty prompt")
            return prompt
        return check_messages(prompt, "'prompt'")
    if "messages" in row:
        return check_messages(row["messages"], "'messages'")
    raise ValueError(f"a GRPO row needs \"prompt\" (text or messages) or \"messages\"; its keys are {sorted(row)}")


def encode_prompt(prompt, tokenizer) -> list[int]:
    """Text prompts as they are (TRL's standard format); messages through the chat template, asking for the reply."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return tokenizer(render_prompt(prompt, tokenizer), add_special_tokens=False)["input_ids"]


def load_prompt_examples(path: str, tokenizer, max_length: int) -> tuple[list[PromptExample], DataStats]:
    """Read a prompt file; a malformed row raises DataError naming file:line. Prompts longer than `max_length`
    keep their last `max_length` tokens (TRL's max_prompt_length truncates on the left)."""
    stats, examples = DataStats(), []
    for lineno, row in read_rows(path):
        try:
            prompt = prompt_of(row)
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        ids = encode_prompt(prompt, tokenizer)
        stats.rows += 1
        if len(ids) > max_length:
            stats.truncated += 1
            ids = ids[-max_length:]
        columns = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
        examples.append(PromptExample(prompt, ids, columns))
    if not examples:
        raise DataError(f"{path}: no prompts (a GRPO data file has one JSON row per prompt)")
    return examples, stats


def eos_ids(model, tokenizer) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


def cut_at_eos(ids: list[int], stop: list[int]) -> list[int]:
    """The completion up to and including its first end-of-sequence token (TRL's completion mask)."""
    for i, token in enumerate(ids):
        if token in stop:
            return ids[:i + 1]
    return ids


@torch.no_grad()
def sample_completions(model, tokenizer, prompt_rows: list[list[int]], max_new_tokens: int, temperature: float,
                       top_p: float, device, **generate_options) -> list[list[int]]:
    """One completion per prompt row (greedy at temperature 0), generated GENERATION_BATCH rows at a time with
    left padding, in eval mode (no dropout), on the adapted model as it is (`generate_options`: more of
    `generate`'s, e.g. min_new_tokens for benchmarks)."""
    pad_id, stop, out = pad_token_id(tokenizer), eos_ids(model, tokenizer), []
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with eval_mode(model), attention_backends(device):
        for i in range(0, len(prompt_rows), GENERATION_BATCH):
            rows = prompt_rows[i:i + GENERATION_BATCH]
            ids, mask = left_padded(rows, pad_id, device)
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                       pad_token_id=pad_id, eos_token_id=stop, **sampling, **generate_options)
            out += [cut_at_eos(row[ids.shape[1]:].tolist(), stop) for row in generated]
    return out


def decode_completions(tokenizer, prompts: list, completion_ids: list[list[int]]) -> list:
    """Completions as reward functions get them: text, or one assistant message for message prompts (TRL)."""
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]


def reward_inputs(examples: list[PromptExample]) -> tuple[list, dict[str, list]]:
    """(prompts, columns) lists aligned with `examples` (one entry per completion)."""
    names = sorted({k for e in examples for k in e.columns})
    return [e.prompt for e in examples], {k: [e.columns.get(k) for e in examples] for k in names}


def completion_batch(items: list[Completion], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows and, per row, the positions and ids of its completion tokens."""
    sequences = [c.prompt_ids + c.completion_ids for c in items]
    width = max(len(c.completion_ids) for c in items)
    return {"input_ids": right_pad(sequences, pad_id).to(device),
            "attention_mask": right_pad([[1] * len(s) for s in sequences], 0).to(device),
            "completion_ids": right_pad([c.completion_ids for c in items], pad_id).to(device),
            "completion_mask": right_pad([[1] * len(c.completion_ids) for c in items], 0).to(device).float(),
            "prompt_lengths": torch.tensor([len(c.prompt_ids) for c in items]), "width": width}


def completion_logps(peft_model, batch: dict, temperature: float, fused: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies), each (rows, completion width), of every completion token given what precedes it,
    under the model as it is now (zeros at padding)."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    mask = batch["completion_mask"].bool()
    rows, cols = mask.nonzero(as_tuple=True)
    positions = batch["prompt_lengths"].to(rows.device)[rows] + cols - 1  # the position that predicts the token
    targets = batch["completion_ids"][rows, cols]
    if fused and fused_head_supported(base):
        hidden = decoder_hidden(base, batch["input_ids"], batch["attention_mask"])
        token, entropy = G.head_token_logps(hidden[rows, positions], base.get_output_embeddings().weight, targets,
                                            temperature)
    else:
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False).logits
        logp = (logits[rows, positions].float() / temperature).log_softmax(-1)
        token = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1).detach()
    shape = mask.shape
    return (token.new_zeros(shape).index_put((rows, cols), token),
            entropy.new_zeros(shape).index_put((rows, cols), entropy))


def per_row(values: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [values[i, :int(mask[i].sum())].detach().cpu() for i in range(values.shape[0])]


def padded(rows: list[torch.Tensor], width: int, device) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out.to(device)


class GRPO:
    """The GRPO part of a run: the settings it needs, the reward functions, the rollouts in use."""

    def __init__(self, cfg, peft_model, tokenizer, rewards: list[Reward], device):
        self.cfg, self.model, self.tokenizer, self.rewards, self.device = cfg, peft_model, tokenizer, rewards, device
        self.pad_id = pad_token_id(tokenizer)
        self.weights = torch.tensor([r.weight for r in rewards], dtype=torch.float64)
        self.rollouts: list[list[Completion]] | None = None  # the micro-batches of the rollouts in use
        self.rollout_metrics: dict[str, float] = {}

    # --- rollouts -------------------------------------------------------------------------------------------
    def generate(self, prompts: list[PromptExample], step: int) -> None:
        """Sample num_generations completions per prompt, score them, set the rollouts in use (micro-batches)."""
        cfg, g = self.cfg, self.cfg.num_generations
        repeated = [e for e in prompts for _ in range(g)]  # a prompt's generations are consecutive (one group)
        ids = sample_completions(self.model, self.tokenizer, [e.prompt_ids for e in repeated],
                                 cfg.max_completion_length, cfg.temperature, cfg.top_p, self.device)
        prompt_objs, columns = reward_inputs(repeated)
        per_func = score(self.rewards, prompt_objs, decode_completions(self.tokenizer, prompt_objs, ids), ids, columns)
        rewards = G.total_rewards(per_func, self.weights)
        advantages, zero_std = G.group_advantages(rewards, g, cfg.scale_rewards)
        items = [Completion(e.prompt_ids, c, float(a)) for e, c, a in zip(repeated, ids, advantages.tolist())]
        # shuffled into micro-batches (TRL shuffles the generation batch before splitting it), seeded by the step
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed + step)).tolist()
        items = [items[i] for i in order]
        self.rollouts = [items[k:k + cfg.batch_size] for k in range(0, len(items), cfg.batch_size)]
        self._reference_and_old_logps()
        stop = set(eos_ids(self.model, self.tokenizer))
        lengths = torch.tensor([float(len(c)) for c in ids])
        metrics = {"reward": float(torch.nanmean(rewards)), "reward_std": float(G.nan_std(rewards)),
                   "frac_reward_zero_std": float(zero_std.float().mean()),
                   "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                   "completions/max_length": float(lengths.max()),
                   "completions/clipped_ratio": sum(1.0 for c in ids if not c or c[-1] not in stop) / len(ids)}
        for k, reward in enumerate(self.rewards):
            metrics[f"rewards/{reward.name}/mean"] = float(torch.nanmean(per_func[:, k]))
            metrics[f"rewards/{reward.name}/std"] = float(G.nan_std(per_func[:, k]))
        self.rollout_metrics = metrics

    @torch.no_grad()
    def _reference_and_old_logps(self) -> None:
        """Per-token log-probs the update compares against: the reference (adapter off) when beta != 0, π_old
        (the sampling policy) when the rollouts are reused; computed once, at generation."""
        cfg = self.cfg
        for items in self.rollouts:
            batch = completion_batch(items, self.pad_id, self.device)
            mask = batch["completion_mask"]
            with attention_backends(self.device):
                if cfg.beta != 0.0:
                    with self.model.disable_adapter():
                        ref = completion_logps(self.model, batch, cfg.temperature, cfg.fused_kernels)[0]
                    for c, r in zip(items, per_row(ref, mask)):
                        c.ref_logps = r
                if cfg.num_iterations > 1:
                    old = completion_logps(self.model, batch, cfg.temperature, cfg.fused_kernels)[0]
                    for c, r in zip(items, per_row(old, mask)):
                        c.old_logps = r

    # --- the update -------------------------------------------------------------------------------------------
    def micro_batch_loss(self, items: list[Completion], step_tokens: float) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch as its share of the step (backward on it), and its metric sums."""
        cfg = self.cfg
        batch = completion_batch(items, self.pad_id, self.device)
        mask, width = batch["completion_mask"], batch["width"]
        logps, entropy = completion_logps(self.model, batch, cfg.temperature, cfg.fused_kernels)
        old = padded([c.old_logps for c in items], width, self.device) if cfg.num_iterations > 1 else logps.detach()
        ref = padded([c.ref_logps for c in items], width, self.device) if cfg.beta != 0.0 else None
        advantages = torch.tensor([c.advantage for c in items], dtype=torch.float32, device=self.device)
        eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
        per_token, kl, ratio = G.per_token_objective(logps, old, ref, advantages, cfg.beta, cfg.epsilon, eps_high,
                                                     cfg.use_bias_correction_kl)
        loss = G.reduce_loss(per_token, mask, cfg.loss_type, cfg.grad_accum, cfg.max_completion_length,
                             step_tokens)
        sums = {"entropy": float((entropy * mask).sum()), "tokens": float(mask.sum()),
                **{k: float(v) for k, v in G.clip_fractions(ratio.detach(), advantages, mask, cfg.epsilon,
                                                            eps_high).items()}}
        if kl is not None:
            sums["kl"] = float((kl.detach() * mask).sum())
        return loss, sums

    def step_tokens(self) -> int:
        """Tokens the step's forward passes run over (prompt + completion)."""
        return sum(len(c.prompt_ids) + len(c.completion_ids) for items in self.rollouts for c in items)

    def completion_tokens(self) -> float:
        """Completion tokens of the step (dapo's normaliser)."""
        return float(sum(len(c.completion_ids) for items in self.rollouts for c in items))

    def state(self) -> dict:
        return {"rollouts": self.rollouts, "rollout_metrics": self.rollout_metrics}

    def load_state(self, state: dict | None) -> None:
        if state:
            self.rollouts, self.rollout_metrics = state["rollouts"], state["rollout_metrics"]

    # --- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, examples: list[PromptExample]) -> dict[str, float]:
        """Greedy completions of held-out prompts, scored: eval_reward and eval_rewards/<fn>/mean."""
        ids = sample_completions(self.model, self.tokenizer, [e.prompt_ids for e in examples],
                                 self.cfg.max_completion_length, 0.0, 1.0, self.device)
        prompts, columns = reward_inputs(examples)
        per_func = score(self.rewards, prompts, decode_completions(self.tokenizer, prompts, ids), ids, columns)
        record = {"eval_reward": float(torch.nanmean(G.total_rewards(per_func, self.weights)))}
        for k, reward in enumerate(self.rewards):
            record[f"eval_rewards/{reward.name}/mean"] = float(torch.nanmean(per_func[:, k]))
        return record
