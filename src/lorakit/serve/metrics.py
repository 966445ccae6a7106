"""The engine's counters and histograms, written as Prometheus text (GET /metrics), with vLLM's metric names
where vLLM has one (prefix `lorakit:` instead of `vllm:`)."""

from __future__ import annotations

import bisect
import threading
import time

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [f"# TYPE {name} histogram"], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{"+Inf" if bound == float("inf") else bound}"}} {cumulative}')
        return [*out, f"{name}_sum {self.total}", f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.rows = Histogram(ROWS_BUCKETS)  # rows per decoding step
        self.prompt_tokens = self.generation_tokens = self.requests = 0
        self.running = self.waiting = 0
        self.kv_bytes = self.kv_used_bytes = 0

    def submitted(self, job) -> None:
        job.submitted_at = time.perf_counter()
        with self.lock:
            self.requests += 1

    def prefilled(self, job) -> None:
        with self.lock:
            self.prompt_tokens += len(job.ids)

    def token(self, job) -> None:
        now = time.perf_counter()
        with self.lock:
            self.generation_tokens += 1
            if len(job.generated) == 1:
                self.ttft.observe(now - job.submitted_at)
            else:
                self.itl.observe(now - job.last_token_at)
        job.last_token_at = now

    def decoded(self, rows: int) -> None:
        with self.lock:
            self.rows.observe(rows)

    def sample(self, scheduler) -> None:
        """Gauges, after each iteration of the scheduler."""
        self.running = len(scheduler.running) + len(scheduler.prefilling)
        self.waiting = len(scheduler.waiting) + scheduler.engine.jobs.qsize()
        self.kv_bytes, self.kv_used_bytes = scheduler.batch.nbytes(), scheduler.batch.used_bytes()

    def text(self, engine) -> str:
        pool, prefix = engine.pool, engine.prefix_cache
        gauges = {
            "num_requests_running": (self.running, "requests being prefilled or decoded"),
            "num_requests_waiting": (self.waiting, "requests waiting for a batch row, memory or their adapter"),
            "kv_cache_usage_perc": ((self.kv_bytes + prefix.nbytes) / engine.kv_budget,
                                    "KV cache memory allocated (batch buffer + prefix cache) / --kv-cache-gb"),
            "kv_cache_used_bytes": (self.kv_used_bytes, "bytes of the batch buffer holding live tokens"),
            "kv_cache_allocated_bytes": (self.kv_bytes, "bytes of the batch buffer"),
            "prefix_cache_bytes": (prefix.nbytes, "bytes of cached prompt prefixes"),
            "lora_adapters_resident": (len(pool.resident), "adapters loaded in memory (at most --max-cpu-loras)"),
        }
        counters = {
            "request_total": (self.requests, "requests accepted"),
            "prompt_tokens_total": (self.prompt_tokens, "prompt tokens prefilled"),
            "generation_tokens_total": (self.generation_tokens, "tokens generated"),
            "prefix_cache_hits_total": (prefix.hits, "prompts that reused a cached prefix"),
            "prefix_cache_queries_total": (prefix.hits + prefix.misses, "prefix cache lookups"),
            "prefix_cache_hit_tokens_total": (prefix.hit_tokens, "prompt tokens not prefilled thanks to the cache"),
            "lora_adapter_loads_total": (pool.loads, "adapters loaded from disk"),
            "lora_adapter_cache_hits_total": (pool.hits, "requests whose adapter was already in memory"),
            "lora_adapter_evictions_total": (pool.evictions, "adapters unloaded to make room (least recently used)"),
        }
        lines = []
        for kind, table in (("gauge", gauges), ("counter", counters)):
            for name, (value, help_text) in table.items():
                lines += [f"# HELP lorakit:{name} {help_text}", f"# TYPE lorakit:{name} {kind}",
                          f"lorakit:{name} {value}"]
        with self.lock:
            lines += [f"# HELP lorakit:time_to_first_token_seconds from arrival to the first token",
                      *self.ttft.lines("lorakit:time_to_first_token_seconds"),
                      "# HELP lorakit:inter_token_latency_seconds between two tokens of one request",
                      *self.itl.lines("lorakit:inter_token_latency_seconds"),
                      "# HELP lorakit:decode_batch_rows requests decoded together in one step",
                      *self.rows.lines("lorakit:decode_batch_rows")]
        return "\n".join(lines) + "\n"
