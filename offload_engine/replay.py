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

The CPU tier (hybrid execution, issue 23; `cpu=CpuTier(...)`): per layer call, the missed experts (neither
resident nor staged) go through `placement.place_misses` with the costs the engine would calibrate (a copy at
the H2D rate, an expert's kernels at `kernel_gbps`, the CPU's stated ms per expert). The CPU's experts are not
copied and change nothing in the cache (no copy, no eviction, no policy touch: the runtime does the same); they
run on a fourth timeline, "cpu", from the moment of the routing read (after any write-back still filling their host
slot), one after another, plus one round trip (their rows of x down, the results back). The device's experts go
through `schedule.run_layer` as before. The host then does its own share of the hand-over (`call_host_ms`) and
joins the worker: a stream cannot wait for a host-side result without the host, so the next layer's host work
and kernels start only once the CPU's results are back, and a layer with CPU experts ends when both tiers are
done. On a CPU whose cores the kernel's threads all take (`oversubscribed`: Colab's 2 vCPUs), the host thread's
hand-over work preempts a kernel thread, and an OpenMP call ends with its slowest thread: the CPU op is stretched
by that work. `cpu=None` or mode `off` replays today's copy-only engine exactly.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from .expert_cache import ExpertCache
from .placement import CPU_COMPUTE_CHOICES, PlacementCosts, place_misses
from .schedule import run_layer
from .stream_check import TimedEvent, TimedStreams

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
class CpuTier:
    """The CPU as a second compute tier (every input a stated number), and the placement mode."""
    expert_ms: tuple[tuple[int, float], ...]  # (tokens, the CPU kernel's ms for one expert in the model's dtype)
    round_trip_ms: float = 0.1  # a layer's CPU rows device->host and the results back, with the worker's wake-up
    call_host_ms: float = 0.1  # the host thread's own work per layer call with CPU experts: rows, submit, join, add
    oversubscribed: bool = False  # the kernel's threads take every core: the host's hand-over work stretches it
    mode: str = "auto"  # offload.cpu_compute: auto | off | always

    def __post_init__(self):
        if self.mode not in CPU_COMPUTE_CHOICES:
            raise ValueError(f"cpu_compute must be one of {', '.join(CPU_COMPUTE_CHOICES)}, got {self.mode!r}")


class HybridStreams(TimedStreams):
    """TimedStreams with a fourth timeline, "cpu": the worker thread running CPU experts (ops in seconds)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.queues["cpu"] = deque()
        self.last["cpu"] = None
        self.busy["cpu"] = 0.0

    def cpu_work(self, seconds: float, after: tuple = (), label: str = "cpu") -> TimedEvent:
        """Queue `seconds` of CPU work that starts once the host has queued it and the ops `after` have ended."""
        self._queue("cpu", "kernel", seconds, deps=after, label=label)
        return TimedEvent({}, self.last["cpu"])


@dataclass
class ReplayResult:
    steps: int
    batch: int
    seconds: float
    busy_s: dict  # per timeline: host (its own work), compute, h2d, d2h, cpu
    critical_s: dict  # per timeline: its share of the chain of ops that ended last
    both_copying_s: float  # copy-ins and write-backs running at the same time
    stats: dict = field(default_factory=dict)  # the cache's counters summed over layers, and cpu_computed
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
        return self.stats["hits"] / (self.stats["lookups"] + self.stats["cpu_computed"])


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


def placement_costs(costs: ModelCosts, speeds: Speeds, cpu: CpuTier) -> PlacementCosts:
    """What the engine's calibration at load would find on the replay's machine."""
    return PlacementCosts(copy_ms=1e3 * costs.expert_bytes / (speeds.h2d_gbps * GB),
                          device_ms=1e3 * costs.expert_kernel_bytes / (speeds.kernel_gbps * GB),
                          cpu_ms=cpu.expert_ms, round_trip_ms=cpu.round_trip_ms, join_ms=speeds.host_ms_per_layer)


def _expert_kernel_s(costs: ModelCosts, speeds: Speeds, tokens: int) -> float:
    return (costs.expert_kernel_bytes + (tokens - 1) * costs.expert_kernel_bytes_per_token) / (speeds.kernel_gbps * GB)


def replay_engine(traces: Mapping[str, np.ndarray], costs: ModelCosts, speeds: Speeds = Speeds(), *, k: int,
                  prefetch: int = 1, policy: str = "lru", write_back: bool = True, batch: int = 1,
                  min_precision: float = 0.0, num_experts: int | None = None, seed: int = 0,
                  keep_ops: bool = False, cpu: CpuTier | None = None) -> ReplayResult:
    """Replay `traces` ({name: experts [tokens, layers, top_k]}, -1 = missing) through the engine's cache with
    `k` experts per layer on the device, and time it. `prefetch`, `policy`, `write_back` and `min_precision`
    (`offload.prefetch_min_precision`) are the engine's settings; `cpu`: the CPU tier and `offload.cpu_compute`
    (None: copy-only). `keep_ops`: keep every op (`result.streams.ops`)."""
    runs = sequences(traces, batch)
    layers = runs[0].shape[1]
    experts = num_experts or max(8, int(max(r.max() for r in runs)) + 1)
    streams = HybridStreams(speeds.h2d_gbps * GB, speeds.d2h_gbps * GB, costs.expert_bytes,
                            None if speeds.duplex_gbps is None else speeds.duplex_gbps * GB, keep_ops=keep_ops)
    # One byte per expert: the real cache's bookkeeping and copies, with the sizes carried by the stand-ins.
    cache = ExpertCache(layers, experts, 1, k, prefetch, torch.device("cpu"), policy, streams=streams,
                        write_back=write_back, prefetch_min_precision=min_precision)
    guess = _Guesser(experts, cache.prefetch_count, speeds.precision, seed)
    kernel_s = lambda nbytes: nbytes / (speeds.kernel_gbps * GB)  # noqa: E731
    trunk_s = kernel_s(costs.trunk_bytes_per_layer + batch * costs.kv_bytes_per_layer)
    host_s = speeds.host_ms_per_layer / 1e3
    hybrid = _CpuTierRun(cache, streams, cpu, placement_costs(costs, speeds, cpu), costs, speeds) if cpu else None

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

            on_cpu = hybrid.start(layer, order, counts) if hybrid else None
            # Only the device's experts go through run_layer (so the prefetch gate scores guesses against them).
            run_layer(cache, layer, [e for e in order if not on_cpu or e not in on_cpu], kernels, then)
            if on_cpu:
                hybrid.join()
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
    totals["cpu_computed"] = hybrid.computed if hybrid else 0
    return ReplayResult(len(runs[0]), batch, streams.host_now, dict(streams.busy), streams.critical_path(),
                        streams.both_copying_s, totals, len(streams.races), streams if keep_ops else None)


class _CpuTierRun:
    """The CPU tier's part of a layer call, kept apart from `schedule.run_layer` (which runs the device's experts):
    place the misses, queue the CPU's experts on the "cpu" timeline, then the host's hand-over and its join."""

    def __init__(self, cache: ExpertCache, streams: HybridStreams, tier: CpuTier, placement: PlacementCosts,
                 costs: ModelCosts, speeds: Speeds):
        self.cache, self.streams, self.tier, self.placement = cache, streams, tier, placement
        self.costs, self.speeds = costs, speeds
        self.computed = 0  # experts computed by the CPU, all layers
        self.pending: TimedEvent | None = None

    def start(self, layer: int, order: Sequence[int], counts: Counter) -> set[int]:
        """Choose and queue this layer call's CPU experts (right after the routing read); returns them."""
        cache = self.cache
        on_device = [e for e in order if e in cache.main[layer] or e in cache.staged[layer]]
        misses = [(e, counts[e]) for e in order if e not in on_device]
        busy_ms = 1e3 * sum(_expert_kernel_s(self.costs, self.speeds, counts[e]) for e in on_device)
        on_cpu = place_misses(misses, self.placement, self.tier.mode, busy_ms)
        if not on_cpu:
            return on_cpu
        # The CPU reads each expert's host slot: after any write-back still filling it (swap mode).
        slots = [cache.host_of[layer][e] for e in on_cpu]
        after = tuple(event.op for event in (cache.host_written[layer][h] for h in slots)
                      if event is not None and getattr(event, "op", None) is not None)
        ms = self.tier.round_trip_ms + sum(self.placement.cpu_expert_ms(counts[e]) for e in on_cpu)
        if self.tier.oversubscribed:
            ms += self.tier.call_host_ms
        self.pending = self.streams.cpu_work(ms / 1e3, after, f"cpu {layer}: {sorted(on_cpu)}")
        self.computed += len(on_cpu)
        return on_cpu

    def join(self) -> None:
        """After the device's experts are queued: the host hands over and takes back, then waits for the results."""
        self.streams.host_work(self.tier.call_host_ms / 1e3, "cpu hand-over")
        self.streams.host_wait(self.pending)
        self.pending = None
