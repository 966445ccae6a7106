"""The training method's settings, checked when a TrainConfig is made: sft, dpo / orpo (preference pairs), grpo."""

from __future__ import annotations

from .grpo_loss import LOSS_TYPES as GRPO_LOSS_TYPES
from .grpo_loss import SCALE_REWARDS

METHODS = ("sft", "dpo", "orpo", "grpo")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def check_method_settings(cfg) -> None:
    """The method's settings (TrainConfig calls this when it is made)."""
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {cfg.method!r}")
    if cfg.method == "grpo":
        return check_grpo_settings(cfg)
    if cfg.loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(DPO_LOSS_TYPES)}, got {cfg.loss_type!r}")
    if not (cfg.beta > 0 and cfg.orpo_lambda > 0 and 0 <= cfg.label_smoothing < 0.5 and cfg.sft_weight >= 0):
        raise ValueError(f"need beta > 0, orpo_lambda > 0, 0 <= label_smoothing < 0.5 and sft_weight >= 0, got "
                         f"beta={cfg.beta}, orpo_lambda={cfg.orpo_lambda}, label_smoothing={cfg.label_smoothing}, "
                         f"sft_weight={cfg.sft_weight}")
    if cfg.method != "sft" and (cfg.task != "causal_lm" or cfg.packing or cfg.train_on_prompt):
        raise ValueError(f"method: {cfg.method} trains a causal LM on preference pairs: it needs task: causal_lm, "
                         "packing: false and train_on_prompt: false")


def check_grpo_settings(cfg) -> None:
    """GRPO's settings as TRL's GRPOConfig names them; the reward functions are imported now."""
    from .rewards import load_rewards  # imports user reward modules: a bad path fails before anything loads

    if cfg.loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type for method: grpo must be one of {list(GRPO_LOSS_TYPES)}, got "
                         f"{cfg.loss_type!r}")
    if cfg.scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {list(SCALE_REWARDS)}, got {cfg.scale_rewards!r}")
    if isinstance(cfg.num_generations, bool) or not isinstance(cfg.num_generations, int) \
            or cfg.num_generations < 2:
        raise ValueError(f"num_generations must be an integer >= 2 (advantages compare a prompt's completions "
                         f"with each other), got {cfg.num_generations!r}")
    per_step = cfg.batch_size * cfg.grad_accum
    if per_step % cfg.num_generations:
        raise ValueError(f"batch_size x grad_accum = {per_step} completions per step must be a multiple of "
                         f"num_generations={cfg.num_generations} (whole groups per step)")
    if not (cfg.beta >= 0 and cfg.temperature > 0 and 0 < cfg.top_p <= 1 and 0 <= cfg.epsilon < 1):
        raise ValueError(f"need beta >= 0, temperature > 0, 0 < top_p <= 1 and 0 <= epsilon < 1, got "
                         f"beta={cfg.beta}, temperature={cfg.temperature}, top_p={cfg.top_p}, "
                         f"epsilon={cfg.epsilon}")
    if cfg.epsilon_high is not None and not cfg.epsilon_high >= 0:
        raise ValueError(f"epsilon_high must be a number >= 0 or null, got {cfg.epsilon_high!r}")
    if cfg.task != "causal_lm" or cfg.packing or cfg.train_on_prompt:
        raise ValueError("method: grpo trains a causal LM on its own completions: it needs task: causal_lm, "
                         "packing: false and train_on_prompt: false")
    load_rewards(cfg.rewards)
