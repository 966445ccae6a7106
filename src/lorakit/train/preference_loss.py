"""Preference losses (DPO, IPO, ORPO) as pure functions, and the module the training loop calls.

Definitions follow the papers as TRL (1.16) implements them, so a run here and TRL's trainer give the same numbers:
- DPO (Rafailov et al. 2023), `loss_type: sigmoid`: -log σ(β·Δ), Δ = (log π(y_w|x) - log π_ref(y_w|x)) -
  (log π(y_l|x) - log π_ref(y_l|x)), log-probs summed over the response tokens. `label_smoothing` ε > 0 gives the
  conservative DPO of the same paper's appendix (cDPO): -(1-ε)·log σ(β·Δ) - ε·log σ(-β·Δ) (TRL 1.16 has it as
  `loss_type: robust`'s numerator; ε = 0 is plain DPO).
- `sft_weight` w > 0 adds w x the chosen responses' token-mean NLL to every pair's DPO loss (RPO, Pang et al.
  2024; TRL's `loss_type: [sigmoid, sft]` with `loss_weights: [1, w]`): the adapter keeps writing the chosen
  answers fluently while it learns to prefer them.
- `hinge` (SLiC: relu(1 - β·Δ)) and `robust` (rDPO: cDPO's terms with the flipped one subtracted, over
  1 - 2ε) as TRL has them.
- IPO (Azar et al. 2023), `loss_type: ipo`: (Δ' - 1/(2β))², each log-ratio divided by its response's token
  count, as TRL does (confirmed with the IPO authors).
- ORPO (Hong et al. 2024): NLL of the chosen rows - λ·mean log σ(log odds), odds from the length-averaged
  log-probs; as in TRL the NLL is the token mean over the chosen rows' prompt and response (no reference model).
Rewards as TRL logs them: β·(log π - log π_ref) for DPO/IPO, λ·(average log π) for ORPO.

The reference model is the same model with its adapter switched off (`disable_adapter()`, under no_grad): no
second copy of the base. Precomputed reference log-probs (a batch's `ref_logps`) replace that forward.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..hardware import attention_backends
from ..kernels import linear_cross_entropy_sum
from ..kernels.varlen_attention import unpad_batch
from ..utils import eval_mode
from .loss import TOKEN_MULTIPLE, fused_head_supported, is_right_padded, runs_padding_free
from .preference_data import collate_pairs

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
METHODS = ("sft", "dpo", "orpo")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
               loss_type: str = "sigmoid", label_smoothing: float = 0.0, chosen_tokens=None, rejected_tokens=None):
    """(per-pair loss, chosen rewards, rejected rewards); the token counts are IPO's length normalisers."""
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        delta = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)
    elif loss_type == "hinge":  # SLiC (Zhao et al. 2023)
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "robust":  # rDPO (Chowdhury et al. 2024): ε = the probability a label is flipped
        delta = beta * (chosen_ratio - rejected_ratio)
        losses = (-(1 - label_smoothing) * F.logsigmoid(delta) + label_smoothing * F.logsigmoid(-delta)) \
            / (1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_losses(chosen_avg_logps, rejected_avg_logps, nll: torch.Tensor, orpo_lambda: float):
    """(per-pair loss, chosen rewards, rejected rewards, log σ(log odds), log odds) from length-averaged log-probs
    and the chosen rows' token-mean NLL."""
    chosen, rejected = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    return (nll - orpo_lambda * ratio, orpo_lambda * chosen.detach(), orpo_lambda * rejected.detach(),
            ratio.detach(), log_odds.detach())


def decoder_hidden(base: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """The decoder's last hidden states (rows, T, d) of a batch: padding-free where the model runs it, mask-free for
    right padding (it changes no real token's output: the causal kernel), with the mask otherwise."""
    decoder = base.get_decoder()
    if not is_right_padded(attention_mask):
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    if runs_padding_free(base, input_ids):
        # rows end to end, no work on padding; lengths rounded to a few shapes (the filler's outputs dropped)
        packed = unpad_batch(input_ids, input_ids, attention_mask, multiple=TOKEN_MULTIPLE)
        out = decoder(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                      use_cache=False).last_hidden_state[0, :int(attention_mask.sum())]
        return out.new_zeros(*input_ids.shape, out.shape[-1]).index_put(attention_mask.bool().nonzero(as_tuple=True),
                                                                        out)
    return decoder(input_ids=input_ids, use_cache=False).last_hidden_state


def token_logps(model: nn.Module, input_ids, attention_mask, selections: list[torch.Tensor], fused: bool):
    """For each mask in `selections` ((rows, T-1) masks over target positions 1..T-1), the per-row sums of
    log p(token | earlier tokens) over its positions; one forward for all. Fused path (a plain frozen head): the
    decoder's hidden states, then each row's head + log-softmax at the selected positions only, in chunks (no
    (tokens x vocab) logits kept); padding-free where the model runs it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = input_ids[:, 1:]
    if not (fused and fused_head_supported(base)):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        per_token = torch.gather(logits.float().log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)
        return [(per_token * mask).sum(dim=1) for mask in selections]
    hidden, weight = decoder_hidden(base, input_ids, attention_mask)[:, :-1], base.get_output_embeddings().weight
    return [torch.stack([-linear_cross_entropy_sum(hidden[i][mask[i]], weight, targets[i][mask[i]])
                         for i in range(input_ids.shape[0])]) for mask in selections]


def count_pairs(batch: dict) -> int:
    return int(batch["input_ids"].shape[0] // 2)


class PreferenceLoss(nn.Module):
    """forward(batch of 2n rows from preference_data.collate_pairs) -> the sum over its n pairs of the per-pair
    loss (the loop divides by the pairs of the step). Each call adds the batch's metric sums (TRL's names) to
    `metric_sums`; `take_metrics()` returns and clears them."""

    count_targets = staticmethod(count_pairs)

    def __init__(self, peft_model: nn.Module, method: str = "dpo", beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, orpo_lambda: float = 0.1, sft_weight: float = 0.0, fused: bool = True):
        super().__init__()
        if method not in ("dpo", "orpo"):
            raise ValueError(f"PreferenceLoss method must be 'dpo' or 'orpo', got {method!r}")
        self.peft_model, self.method, self.fused = peft_model, method, fused
        self.beta, self.loss_type, self.label_smoothing, self.orpo_lambda = beta, loss_type, label_smoothing, orpo_lambda
        self.sft_weight = sft_weight
        self.metric_sums: dict[str, float] = {}

    @torch.no_grad()
    def reference_logps(self, input_ids, attention_mask, completion_mask, adapter_on: bool = False) -> torch.Tensor:
        """Response log-probs of each row under the reference: this model with its adapter switched off (or, with
        `adapter_on`, the adapter as it is now: a starting adapter is the reference)."""
        with nullcontext() if adapter_on else self.peft_model.disable_adapter():
            return token_logps(self.peft_model, input_ids, attention_mask, [completion_mask[:, 1:].bool()],
                               self.fused)[0]

    def forward(self, input_ids, attention_mask, completion_mask, ref_logps=None) -> torch.Tensor:
        n = input_ids.shape[0] // 2
        response = completion_mask[:, 1:].bool()
        if self.method == "orpo":  # one forward: response log-probs and the chosen rows' NLL from the same states
            chosen_rows = attention_mask[:, 1:].bool()
            chosen_rows[n:] = False
            logps, chosen_sums = token_logps(self.peft_model, input_ids, attention_mask, [response, chosen_rows],
                                             self.fused)
            nll = -chosen_sums.sum() / chosen_rows.sum()
            avg = logps / response.sum(dim=1)
            losses, chosen_r, rejected_r, ratio, log_odds = orpo_losses(avg[:n], avg[n:], nll, self.orpo_lambda)
            extra = {"nll_loss": float(nll.detach()) * n, "log_odds_ratio": float(ratio.sum()),
                     "log_odds_chosen": float(log_odds.sum())}
            logps = avg
        else:
            logps = token_logps(self.peft_model, input_ids, attention_mask, [response], self.fused)[0]
            if ref_logps is None:
                ref_logps = self.reference_logps(input_ids, attention_mask, completion_mask)
            ref_logps = ref_logps.to(logps.dtype)
            tokens = completion_mask.sum(dim=1)
            losses, chosen_r, rejected_r = dpo_losses(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], self.beta,
                                                      self.loss_type, self.label_smoothing, tokens[:n], tokens[n:])
            extra = {}
            if self.sft_weight:  # + the chosen responses' token-mean NLL (TRL's loss_type [..., "sft"])
                nll = -logps[:n].sum() / response[:n].sum()
                losses = losses + self.sft_weight * nll
                extra["nll_loss"] = float(nll.detach()) * n
        self._add_metrics({"rewards/chosen": chosen_r.sum(), "rewards/rejected": rejected_r.sum(),
                           "rewards/accuracies": (chosen_r > rejected_r).float().sum(),
                           "rewards/margins": (chosen_r - rejected_r).sum(),
                           "logps/chosen": logps[:n].detach().sum(), "logps/rejected": logps[n:].detach().sum()},
                          extra)
        return losses.sum()

    def _add_metrics(self, sums: dict, extra: dict) -> None:
        for name, value in {**sums, **extra}.items():
            self.metric_sums[name] = self.metric_sums.get(name, 0.0) + float(value)

    def take_metrics(self) -> dict[str, float]:
        sums, self.metric_sums = self.metric_sums, {}
        return sums


@torch.no_grad()
def precompute_reference(loss_module: PreferenceLoss, examples: list, batch_size: int, pad_id: int, device,
                         adapter_on: bool = False, log=print) -> None:
    """Set each example's `ref_logps` (chosen, rejected): the model with its adapter off, or with `adapter_on` the
    adapter as it is now (a starting adapter is DPO's reference, as in TRL). Eval mode: no dropout."""
    model = loss_module.peft_model
    reference = "the starting adapter" if adapter_on else "the base model (adapter off)"
    log(f"reference log-probs of {reference}: computed once over {len(examples)} pairs")
    with eval_mode(model):
        for i in tqdm(range(0, len(examples), batch_size), desc="reference log-probs", unit="batch", leave=False):
            chunk = examples[i:i + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items() if k != "ref_logps"}
            with attention_backends(device):
                values = loss_module.reference_logps(**batch, adapter_on=adapter_on).float().tolist()
            for k, example in enumerate(chunk):
                example.ref_logps = (values[k], values[len(chunk) + k])
