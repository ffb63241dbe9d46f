"""Prometheus metrics of one server: requests, tokens, latencies, the queue, and the engine's expert cache.

Each server has its own registry, so several can live in one process (tests). The expert-cache figures are read
from the cache's counters when /metrics is scraped; they are cumulative since the engine was loaded.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..cache_stats import LayerStats, hit_rate, prefetch_precision, total

# Time to first token on a CPU demo model is milliseconds; on Mixtral with experts offloaded, seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class CacheCollector:
    """Expert-cache hit rate, prefetch precision (with their parts) and bytes copied, summed over layers at scrape
    time; the rates as cache_stats.py defines them.

    Reads the counters directly rather than through Engine.stats(): a scrape must not wait for a generation."""

    def __init__(self, layer_stats: Callable[[], list[LayerStats]]):
        self.layer_stats = layer_stats

    def collect(self):
        stats = total(self.layer_stats())
        yield GaugeMetricFamily("offload_expert_cache_hit_rate", "Expert-cache hits / lookups since loading",
                                value=hit_rate(stats).value)
        yield CounterMetricFamily("offload_expert_cache_lookups", "Expert-cache lookups", value=stats.lookups)
        yield CounterMetricFamily("offload_expert_cache_hits", "Expert-cache hits", value=stats.hits)
        yield GaugeMetricFamily("offload_prefetch_precision", "Speculation's guesses that the layer then used / "
                                "guesses (offload_prefetch_guesses_used_total / offload_prefetch_guesses_total)",
                                value=prefetch_precision(stats).value)
        yield CounterMetricFamily("offload_prefetch_guesses", "Experts named by speculation (resident or not)",
                                  value=stats.guessed)
        yield CounterMetricFamily("offload_prefetch_guesses_used", "Guessed experts that the layer then used",
                                  value=stats.guessed_correct)
        copies = CounterMetricFamily("offload_prefetch_copies", "Experts copied ahead of need, by outcome "
                                     "(issued = used + wasted + still staged)", labels=["outcome"])
        for outcome in ("issued", "used", "wasted"):
            copies.add_metric([outcome], getattr(stats, f"prefetch_{outcome}"))
        yield copies
        copied = CounterMetricFamily("offload_bytes_copied", "Expert bytes copied between host and device",
                                     labels=["direction"])
        copied.add_metric(["host_to_device"], stats.bytes_h2d)
        copied.add_metric(["device_to_host"], stats.bytes_d2h)
        yield copied
        yield CounterMetricFamily("offload_cpu_computed_experts", "Missed experts computed on the CPU from their "
                                  "host copy (hybrid execution, offload.cpu_compute) instead of copied",
                                  value=stats.cpu_computed)
        yield CounterMetricFamily("offload_cpu_compute_seconds", "CPU worker time computing those experts",
                                  value=stats.cpu_ms / 1000)


class Metrics:
    def __init__(self, queue_depth: Callable[[], int], layer_stats: Callable[[], list[LayerStats]],
                 running: Callable[[], int] = lambda: 0):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("offload_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("offload_prompt_tokens", "Prompt tokens of the requests served",
                                     registry=registry)
        self.reused_tokens = Counter("offload_prefix_reused_tokens",
                                     "Prompt tokens whose KV cache was reused from the previous request",
                                     registry=registry)
        self.generated_tokens = Counter("offload_generated_tokens", "Tokens generated", registry=registry)
        self.disconnects = Counter("offload_generations_stopped_by_disconnect",
                                   "Requests whose client went away before the end: generation stopped",
                                   registry=registry)
        self.ttft = Histogram("offload_time_to_first_token_seconds",
                              "From the request's arrival (queue wait included) to its first generated token",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.token_latency = Histogram("offload_time_per_output_token_seconds",
                                       "Time between consecutive generated tokens", buckets=TOKEN_BUCKETS,
                                       registry=registry)
        self.queue_depth = Gauge("offload_queue_depth", "Requests waiting for the engine", registry=registry)
        self.queue_depth.set_function(queue_depth)
        self.running = Gauge("offload_running_requests", "Requests in the running batch (generated together)",
                             registry=registry)
        self.running.set_function(running)
        self.batch_size = Histogram("offload_batch_size", "Sequences in each forward step (continuous batching)",
                                    buckets=BATCH_BUCKETS, registry=registry)
        registry.register(CacheCollector(layer_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
