"""A completion request's fields -> `Params` (validated; anything wrong is an InvalidRequest, a 400)."""

from __future__ import annotations

from dataclasses import dataclass

from .engine import Engine
from .errors import InvalidRequest
from .sampling import Sampling, check_fields, stop_strings


def _int_param(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value:
        raise InvalidRequest(f"{name} must be an integer >= {low}, got {value!r}", "invalid_" + name)
    return min(value, high)


@dataclass
class Params:
    adapter: str | None
    max_tokens: int
    sampling: Sampling
    stream: bool
    ignore_eos: bool
    stops: list[str]
    include_usage: bool


def request_params(engine: Engine, body: dict) -> Params:
    check_fields(body)
    adapter = engine.resolve(body.get("model"))
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int_param(body, limit_name, 128, 1, engine.config.max_tokens_cap)
    sampling = Sampling.from_request(body)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(options.get("include_usage", False), bool):
        raise InvalidRequest(f"stream_options supports {{\"include_usage\": true|false}} only, got {options!r}",
                             "invalid_stream_options")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest(f"stream must be true or false, got {stream!r}", "invalid_stream")
    n = body.get("n", 1)
    if n is not None and n != 1 or isinstance(n, bool):
        raise InvalidRequest(f"n must be 1 (one choice per request; send n requests for n answers), got {n!r}",
                             "invalid_n")
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: decode max_tokens tokens (benchmarks)
    if not isinstance(ignore_eos, bool):
        raise InvalidRequest(f"ignore_eos must be true or false, got {ignore_eos!r}", "invalid_ignore_eos")
    return Params(adapter, max_tokens, sampling, stream, ignore_eos, stop_strings(body),
                  options.get("include_usage", False))
