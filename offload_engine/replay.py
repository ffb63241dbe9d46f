"""The timed replay: the engine's own expert cache, driven over routing traces in the model loop's order, on
stand-in streams that carry simulated time (`stream_check.TimedStreams`). Its tokens/s is what the engine's copy
pipeline delivers at the stated speeds, not what a formula assumes it does.

Per decode step (one token for each of `batch` sequences), as `OffloadedModel._forward` runs it on a GPU:
  * with prefetch, the guesses for the first MoE layers are read to the host (a sync) and copied;
  * per MoE layer: the trunk's kernels (attention, router: `trunk_bytes_per_layer` + `kv_bytes_per_layer` per
    sequence) are queued, the host does its own work (`host_ms_per_layer`: launching them, the guess, the cache's
    bookkeeping), then reads the routing (it waits for the compute stream), and runs the layer through
    `schedule.run_layer` — the function the model itself uses: acquire (demand copies), the next guesses'
    copies, then per expert its kernels (`expert_kernel_bytes`, plus `expert_kernel_bytes_per_token` for each
    further token routed to it) on the compute stream, which waits for the expert's copy-in;
  * the lm_head (`head_bytes`), then the sampler's read of the token (a sync).
Kernels take bytes / `kernel_gbps`; copies move `expert_bytes` at the link's rates (`Speeds`).

Guesses are not computed (the traces hold routing, not hidden states): a guess for a layer names, per guess, the
next of that layer's routed experts (most tokens first) with probability `precision`, else an expert it does not
use. `batch` > 1 interleaves B sequences (the traces' tokens cut into B runs): a step looks up the distinct experts
of B tokens per layer, as a batched forward does.

The CPU tier (hybrid execution, issue 23; `cpu=CpuSpeeds(...)`): per layer call, `placement.place_layer` picks
the misses the CPU computes with the costs the engine would calibrate (a copy at the H2D rate, an expert's kernels
at `kernel_gbps`, the CPU's stated ms per expert, the host's ms per layer), and `schedule.run_layer` runs them
as the engine does: their host slots are lent to the CPU (a lookup and a miss each, no copy, no eviction), their
work goes on the "cpu" timeline right after the routing read (behind any write-back still filling a slot), one
expert after another plus one round trip (their rows of x down, the results back); the device's experts are
queued meanwhile; then the host does its share of the hand-over (`call_host_ms`) and joins the worker: a stream
cannot wait for a host-side result without the host, so the next layer's host work and kernels start only once
the CPU's results are back. On a CPU whose cores the kernel's threads all take (`oversubscribed`: Colab's 2
vCPUs), the host thread's hand-over work preempts a kernel thread, and an OpenMP call ends with its slowest
thread: the CPU op is stretched by that work. `cpu=None` or mode `off` replays today's copy-only engine exactly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from .expert_cache import ExpertCache
from .placement import CPU_COMPUTE_CHOICES, PlacementCosts, place_layer
from .schedule import run_layer
from .stream_check import TimedStreams

GB = 1e9


@dataclass(frozen=True)
class Speeds:
    """The machine, as the replay sees it (every input a stated number)."""
    h2d_gbps: float = 11.5  # pinned host->device copies
    d2h_gbps: float = 11.5  # pinned device->host copies
    duplex_gbps: float | None = None  # both directions at once, in all (None: h2d + d2h, full duplex)
    kernel_gbps: float = 240.0  # device memory bandwidth that bandwidth-bound kernels reach
    host_ms_per_layer: float = 0.5  # the host's own work per MoE layer per step, before the routing read
    precision: float = 0.8  # of the replay's guesses

    def label(self) -> str:
        duplex = "" if self.duplex_gbps is None else f", {self.duplex_gbps:g} both ways"
        return (f"H2D {self.h2d_gbps:g} / D2H {self.d2h_gbps:g} GB/s{duplex}, kernels {self.kernel_gbps:g} GB/s, "
                f"host {self.host_ms_per_layer:g} ms/layer, precision {self.precision:g}")


@dataclass(frozen=True)
class ModelCosts:
    """What one model's decode step moves."""
    expert_bytes: int  # one packed expert: what a copy moves
    expert_kernel_bytes: int  # device-memory traffic of one expert's kernels for one token
    expert_kernel_bytes_per_token: int  # ... for each further token routed to the same expert
    trunk_bytes_per_layer: int  # attention weights, router, norms: read once per step
    kv_bytes_per_layer: int  # the KV cache read by one sequence's token
    head_bytes: int  # lm_head (and final norm) per step


@dataclass(frozen=True)
class CpuSpeeds:
    """The CPU as a second compute tier (every input a stated number), and the placement mode."""
    expert_ms: tuple[tuple[int, float], ...]  # (tokens, the CPU kernel's ms for one expert in the model's dtype)
    round_trip_ms: float = 0.1  # a layer's CPU rows device->host and the results back, with the worker's wake-up
    call_host_ms: float = 0.1  # the host thread's own work per layer call with CPU experts: rows, submit, join, add
    oversubscribed: bool = False  # the kernel's threads take every core: the host's hand-over work stretches it
    mode: str = "auto"  # offload.cpu_compute: auto | off | always

    def __post_init__(self):
        if self.mode not in CPU_COMPUTE_CHOICES:
            raise ValueError(f"cpu_compute must be one of {', '.join(CPU_COMPUTE_CHOICES)}, got {self.mode!r}")


@dataclass
class ReplayResult:
    steps: int
    batch: int
    seconds: float
    busy_s: dict  # per timeline: host (its own work), compute, h2d, d2h, cpu
    critical_s: dict  # per timeline: its share of the chain of ops that ended last
    both_copying_s: float  # copy-ins and write-backs running at the same time
    stats: dict = field(default_factory=dict)  # the cache's counters summed over layers (cpu_computed included)
    races: int = 0  # the stream protocol's race check, on the same run
    streams: TimedStreams | None = field(default=None, repr=False)  # with every op, when asked (`keep_ops`)

    @property
    def tokens(self) -> int:
        return self.steps * self.batch

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def per_token_ms(self, seconds: float) -> float:
        return 1e3 * seconds / self.tokens

    @property
    def copies_per_token(self) -> float:
        return self.stats["bytes_h2d"] / self.stats["expert_bytes"] / self.tokens

    @property
    def write_backs_per_token(self) -> float:
        return self.stats["bytes_d2h"] / self.stats["expert_bytes"] / self.tokens

    @property
    def cpu_per_token(self) -> float:
        return self.stats["cpu_computed"] / self.tokens

    @property
    def device_hit_rate(self) -> float:
        """Of all expert lookups (the CPU's included), the share found resident or staged on the device."""
        return self.stats["hits"] / self.stats["lookups"]


def sequences(traces: Mapping[str, np.ndarray], batch: int) -> list[np.ndarray]:
    """The traces' tokens one after another ([tokens, layers, top_k]), cut into `batch` runs of equal length."""
    rows = np.concatenate([np.asarray(t) for t in traces.values()])
    if batch < 1 or len(rows) < batch:
        raise ValueError(f"batch must be between 1 and the {len(rows)} traced tokens, got {batch}")
    steps = len(rows) // batch
    return [rows[b * steps : (b + 1) * steps] for b in range(batch)]


class _Guesser:
    """Guesses for a layer from its real routing, each right with probability `precision`."""

    def __init__(self, num_experts: int, count: int, precision: float, seed: int):
        self.num_experts, self.count, self.precision = num_experts, count, precision
        self.rng = np.random.default_rng(seed)

    def __call__(self, used: Counter) -> list[int]:
        ranked = [e for e, _ in sorted(used.items(), key=lambda item: -item[1])]  # stable: ties in first-use order
        wrong = [e for e in range(self.num_experts) if e not in used]
        guesses = []
        for _ in range(self.count):
            if ranked and self.rng.random() < self.precision:
                guesses.append(ranked.pop(0))
            elif wrong:
                guesses.append(wrong.pop(int(self.rng.integers(len(wrong)))))
        return guesses


def _routing(step_rows: Sequence[np.ndarray], layer: int) -> tuple[list[int], Counter]:
    """The distinct experts of one layer for the batch's tokens, in order of first use, and tokens per expert."""
    routed = [int(e) for row in step_rows for e in row[layer] if e >= 0]
    return list(dict.fromkeys(routed)), Counter(routed)


def placement_costs(costs: ModelCosts, speeds: Speeds, cpu: CpuSpeeds) -> PlacementCosts:
    """What the engine's calibration at load would find on the replay's machine."""
    return PlacementCosts(copy_ms=1e3 * costs.expert_bytes / (speeds.h2d_gbps * GB),
                          device_ms=1e3 * costs.expert_kernel_bytes / (speeds.kernel_gbps * GB),
                          cpu_ms=cpu.expert_ms, round_trip_ms=cpu.round_trip_ms, join_ms=speeds.host_ms_per_layer)


def _expert_kernel_s(costs: ModelCosts, speeds: Speeds, tokens: int) -> float:
    return (costs.expert_kernel_bytes + (tokens - 1) * costs.expert_kernel_bytes_per_token) / (speeds.kernel_gbps * GB)


def replay_engine(traces: Mapping[str, np.ndarray], costs: ModelCosts, speeds: Speeds = Speeds(), *, k: int,
                  prefetch: int = 1, policy: str = "lru", write_back: bool = True, batch: int = 1,
                  min_precision: float = 0.0, num_experts: int | None = None, seed: int = 0,
                  keep_ops: bool = False, cpu: CpuSpeeds | None = None) -> ReplayResult:
    """Replay `traces` ({name: experts [tokens, layers, top_k]}, -1 = missing) through the engine's cache with
    `k` experts per layer on the device, and time it. `prefetch`, `policy`, `write_back` and `min_precision`
    (`offload.prefetch_min_precision`) are the engine's settings; `cpu`: the CPU tier and `offload.cpu_compute`
    (None: copy-only). `keep_ops`: keep every op (`result.streams.ops`)."""
    runs = sequences(traces, batch)
    layers = runs[0].shape[1]
    experts = num_experts or max(8, int(max(r.max() for r in runs)) + 1)
    streams = TimedStreams(speeds.h2d_gbps * GB, speeds.d2h_gbps * GB, costs.expert_bytes,
                            None if speeds.duplex_gbps is None else speeds.duplex_gbps * GB, keep_ops=keep_ops)
    # One byte per expert: the real cache's bookkeeping and copies, with the sizes carried by the stand-ins.
    cache = ExpertCache(layers, experts, 1, k, prefetch, torch.device("cpu"), policy, streams=streams,
                        write_back=write_back, prefetch_min_precision=min_precision)
    guess = _Guesser(experts, cache.prefetch_count, speeds.precision, seed)
    kernel_s = lambda nbytes: nbytes / (speeds.kernel_gbps * GB)  # noqa: E731
    trunk_s = kernel_s(costs.trunk_bytes_per_layer + batch * costs.kv_bytes_per_layer)
    host_s = speeds.host_ms_per_layer / 1e3
    placement = placement_costs(costs, speeds, cpu) if cpu and cpu.mode != "off" else None

    for step in range(len(runs[0])):
        rows = [run[step] for run in runs]
        routing = [_routing(rows, layer) for layer in range(layers)]
        if cache.prefetch_count:  # layer 0's guess, from the token's embedding: one read, then its copies
            streams.host_wait(streams.record(streams.compute))
            cache.prefetch(0, guess(routing[0][1]))
        for layer in range(layers):
            streams.kernel(trunk_s, f"trunk {layer}")
            streams.host_work(host_s, f"host {layer}")
            streams.host_wait(streams.record(streams.compute))  # the routing read
            order, counts = routing[layer]
            then = None
            if cache.prefetch_count and layer + 1 < layers:
                then = lambda nxt=guess(routing[layer + 1][1]), l=layer + 1: cache.prefetch(l, nxt)  # noqa: E731

            def kernels(expert: int, buffer: torch.Tensor, layer=layer, counts=counts) -> None:
                streams.kernel(_expert_kernel_s(costs, speeds, counts[expert]), f"expert {layer}.{expert}")

            on_cpu = place_layer(order, counts, lambda e, l=layer: cache.is_miss(l, e), placement, cpu.mode) \
                if placement else set()
            run_layer(cache, layer, order, kernels, then, on_cpu, _cpu_kernels(streams, cpu, placement, layer, counts))
        streams.kernel(kernel_s(costs.head_bytes), "lm_head")
        streams.host_wait(streams.record(streams.compute))  # the sampler reads the token
    cache.check_invariant()
    totals = {}
    for layer_stats in cache.stats:
        for name, value in vars(layer_stats).items():
            totals[name] = totals.get(name, 0) + value
    totals["bytes_h2d"] *= costs.expert_bytes  # the cache counted one byte per copy
    totals["bytes_d2h"] *= costs.expert_bytes
    totals["expert_bytes"] = costs.expert_bytes
    return ReplayResult(len(runs[0]), batch, streams.host_now, dict(streams.busy), streams.critical_path(),
                        streams.both_copying_s, totals, len(streams.races), streams if keep_ops else None)


def _cpu_kernels(streams: TimedStreams, cpu: CpuSpeeds | None, placement: PlacementCosts | None, layer: int,
                 counts: Counter):
    """run_layer's `cpu_kernels` for the replay: the layer's CPU experts as one op on the "cpu" timeline (queued
    behind what lending their host slots made it wait for); the returned function is the host's hand-over and
    its wait for the results."""

    def start(jobs: list[tuple[int, torch.Tensor]]):
        ms = cpu.round_trip_ms + sum(placement.cpu_expert_ms(counts[expert]) for expert, _ in jobs)
        if cpu.oversubscribed:
            ms += cpu.call_host_ms
        done = streams.cpu_work(ms / 1e3, f"cpu {layer}: {sorted(expert for expert, _ in jobs)}")

        def join() -> None:
            streams.host_work(cpu.call_host_ms / 1e3, "cpu hand-over")
            streams.host_wait(done)
        return join

    return start if placement else None
