"""A request's decoding settings (OpenAI's fields) and the token pick they define; stop strings.

Every field a request may carry is either honoured here or refused with a 400 naming it (`check_fields`): an
OpenAI-compatible server must not silently ignore `stop: ["!"]` and still return "!".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InvalidRequest

# Honoured fields; then fields accepted only at their default (value -> what the refusal says instead).
HONOURED = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stream",
            "stream_options", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "ignore_eos", "user"}
DEFAULT_ONLY = {"logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
                "tools": (None, []), "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
                "echo": (None, False), "best_of": (None, 1), "suffix": (None, "")}
MAX_STOPS = 4  # OpenAI's limit


def check_fields(body: dict) -> None:
    """Refuse fields this server does not implement (or implements only at their default), naming them."""
    unknown = sorted(k for k in body if k not in HONOURED and k not in DEFAULT_ONLY)
    if unknown:
        raise InvalidRequest(f"unsupported field(s) {unknown}; this server handles {sorted(HONOURED)}",
                             "unsupported_field")
    for key, defaults in DEFAULT_ONLY.items():
        if key in body and body[key] not in defaults:
            raise InvalidRequest(f"{key}={body[key]!r} is not supported by this server (only its default)",
                                 f"unsupported_{key}")


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", f"invalid_{name}")
    return float(value)


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequest(f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them, got {stop!r}",
                             "invalid_stop")
    return stops


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)

    @classmethod
    def from_request(cls, body: dict) -> "Sampling":
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidRequest(f"seed must be an integer, got {seed!r}", "invalid_seed")
        sampling = cls(temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
                       top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
                       presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
                       frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0), seed=seed)
        if seed is not None:  # the same seed and request give the same tokens
            sampling.generator = torch.Generator().manual_seed(seed)
        return sampling

    def pick(self, logits: torch.Tensor, generated: list[int]) -> int:
        """Penalise repeats (OpenAI's presence / frequency penalties), then greedy at temperature 0, else a sample
        of softmax(logits / T) restricted to the top_p nucleus (fp64: a tiny T sharpens it, never to inf/nan)."""
        logits = logits.double()
        if generated and (self.presence_penalty or self.frequency_penalty):
            ids, counts = torch.unique(torch.tensor(generated, device=logits.device), return_counts=True)
            logits = logits.clone()
            logits[ids] -= self.presence_penalty + self.frequency_penalty * counts.double()
        if self.temperature <= 0:
            return int(logits.argmax())
        scaled = logits / self.temperature
        probs = torch.softmax(scaled - scaled.max(), -1)
        if not torch.isfinite(probs).all():  # T so small that even fp64 overflows: the limit is greedy
            return int(logits.argmax())
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < self.top_p  # the smallest set reaching top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))


def cut_at_stop(text: str, stops: list[str], final: bool) -> tuple[str, bool]:
    """(the text that may be sent, whether a stop string ended it). Until `final`, a tail that could begin a stop
    string is held back, so a stop split across tokens is never sent in part."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[:min(hits)], True
    if final or not stops:
        return text, False
    hold = max(len(s) for s in stops) - 1
    for k in range(min(hold, len(text)), 0, -1):  # the longest tail that is a prefix of some stop string
        if any(s.startswith(text[-k:]) for s in stops):
            return text[:-k], False
    return text, False
