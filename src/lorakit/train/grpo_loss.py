"""GRPO's arithmetic as pure functions: group-normalised advantages, the clipped per-token objective with its KL
term, each loss type's normaliser, and per-token log-probabilities of completion tokens.

Definitions follow TRL 1.16's `GRPOTrainer` (its names and defaults), so a step here and TRL's give the same loss
and gradients for the same completions:
- advantages: rewards (weighted sum over reward functions, NaN-aware) minus their group mean; divided by the group's
  (`scale_rewards: group`) or the whole batch's (`batch`) unbiased std + 1e-4, or not at all (`none`). A completion
  no reward function scored (all None) gets advantage 0.
- per token: ratio r = exp(log π - log π_old); loss = -min(r·A, clip(r, 1-ε_low, 1+ε_high)·A) + β·KL with
  KL = exp(ref - log π) - (ref - log π) - 1 (Schulman's k3 estimator; the reference is the adapter switched off),
  times r when `use_bias_correction_kl` (TRL's default).
  π_old is the policy that sampled the completions (detached π itself when each rollout is used once).
- the sum over completion tokens, normalised by loss type: `grpo` each sequence's token mean, then the mean over the
  micro-batch's sequences; `bnpo` the micro-batch's token mean; `dr_grpo` the sum over (sequences x
  max_completion_length); `dapo` the sum over the step's completion tokens (all micro-batches). The first three are
  then divided by the gradient-accumulation steps.
Log-probabilities are of logits / temperature (TRL scores the completions at the temperature that sampled them).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")


def nan_std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std ignoring NaNs (NaN where fewer than two values)."""
    keep = dict(dim=dim, keepdim=True) if dim is not None else {}
    mean = torch.nanmean(x, **keep)
    count = (~torch.isnan(x)).sum(**keep)
    variance = torch.nanmean((x - mean) ** 2, **keep) * count / (count - 1)
    variance = torch.where(count > 1, variance, torch.full_like(variance, float("nan")))
    out = variance.sqrt()
    return out.squeeze(dim) if dim is not None else out


def total_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(completions,) weighted sum over reward functions; NaN where no function scored the completion."""
    total = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    return total.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, whether each completion's scale was zero) for rewards laid out group by group."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {list(SCALE_REWARDS)}, got {scale_rewards!r}")
    groups = rewards.view(-1, num_generations)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nan_std(rewards).expand_as(rewards)
    else:
        std = nan_std(groups, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def per_token_objective(logps, old_logps, ref_logps, advantages, beta: float, epsilon_low: float,
                        epsilon_high: float, bias_correction_kl: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(per-token loss, per-token KL or None, ratio) for (rows, tokens) log-probs and (rows,) advantages.
    `bias_correction_kl` (TRL's default): the KL term times the ratio r, so its gradient is the unbiased reverse-KL
    gradient for completions sampled from π_old (DeepSeek-V3.2); r = 1 in value on a rollout's first use."""
    advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if beta != 0.0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if bias_correction_kl:
            kl = kl * ratio
        loss = loss + beta * kl
    return loss, kl, ratio


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, grad_accum: int,
                max_completion_length: int, step_tokens: float) -> torch.Tensor:
    """The micro-batch's share of the step's loss (see the module docstring); `step_tokens` = completion tokens of
    the whole step (dapo's normaliser)."""
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / grad_accum
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / grad_accum
    if loss_type == "dr_grpo":
        return masked.sum() / (per_token.shape[0] * max_completion_length) / grad_accum
    if loss_type == "dapo":
        return masked.sum() / max(step_tokens, 1.0)
    raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")


def clip_fractions(ratio, advantages, mask, epsilon_low: float, epsilon_high: float) -> dict[str, torch.Tensor]:
    """Masked token sums of TRL's clip indicators (low: ratio under 1-ε with A < 0; high: over 1+ε with A > 0)."""
    a = advantages.unsqueeze(1)
    low = ((ratio < 1 - epsilon_low) & (a < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (a > 0)).float()
    return {"clip_ratio/low_mean": (low * mask).sum(), "clip_ratio/high_mean": (high * mask).sum(),
            "clip_ratio/region_mean": (((low + high) > 0).float() * mask).sum()}


def _head_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float):
    logits = hidden @ weight.t().to(hidden.dtype)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # fp32 at least
    logp = logits.log_softmax(-1)
    token = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return token, entropy


def head_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                     chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy) per row of `hidden` (N, d) under a bias-free head `weight`, at `temperature`;
    `chunk` rows at a time, each chunk's logits recomputed in backward instead of kept (N x vocab never held)."""
    tokens, entropies = [], []
    for i in range(0, hidden.shape[0], chunk):
        args = (hidden[i:i + chunk], weight, targets[i:i + chunk], temperature)
        token, entropy = (checkpoint(_head_logps, *args, use_reentrant=False) if torch.is_grad_enabled()
                          else _head_logps(*args))
        tokens.append(token)
        entropies.append(entropy)
    if not tokens:
        return hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(tokens), torch.cat(entropies)
