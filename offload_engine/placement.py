"""Where a missed expert runs (policy only): copied to the device as today, or computed on the CPU from its host
slot (hybrid execution, `offload.cpu_compute`).

A miss copied to the device costs its bytes over PCIe, then the device's kernels; a miss computed on the CPU costs
its tokens' rows of x device->host and the result back (kilobytes, one round trip for all of a layer's CPU experts)
and the CPU kernel's time. Both queues run at once, so a layer's misses are split so that both finish about
together: each miss, most tokens first, goes to the queue where it would finish earlier. Large token counts (a
prefill) so go to the device, and a decode miss wherever it is done first. The costs are measured on the machine
at load (the engine) or stated per hardware profile (the timed replay), and this one function decides for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

CPU_COMPUTE_CHOICES = ("auto", "off", "always")

# A miss the CPU computes leaves the cache as it was (no copy, no eviction): the expert stays a miss for its next
# lookup where a copy would have made it resident, so the cache's contents freeze as the CPU takes more misses
# (device hit rate on the real Mixtral routing, RTX 3060, k = 4: 61.7 % copy-only, 50.0 % with every miss on the
# CPU). A CPU only just faster than the copy so loses by taking it: the CPU takes a miss only if it is done by
# (1 - FREEZE_MARGIN) of the copy path's end. Measured on the timed replay (BENCHMARKS §5): with no margin, a CPU
# at 2.5 ms per expert beside an RTX 3060 took every single miss and reached 12.99 tok/s where copying them gave
# 13.47, and one at 5.0 ms beside a T4 8.69 where copying gave 8.89. Where the better choice flips differs by
# setup (T4: below 91 % of the copy path's end; RTX 3060: above 91.6 %), so no one margin is right everywhere:
# 0.05 picks the better choice in 8 of the 9 cases scanned and costs 2 % in the ninth (0.1: 7 of 9, up to 4 %).
FREEZE_MARGIN = 0.05


@dataclass(frozen=True)
class PlacementCosts:
    """Milliseconds, measured or stated: what one missed expert costs on each side."""
    copy_ms: float  # one expert's bytes host->device
    device_ms: float  # the device's kernels for one expert at one token (the token count barely matters in decode)
    cpu_ms: tuple[tuple[int, float], ...]  # (tokens, the CPU kernel's ms for one expert), tokens ascending
    round_trip_ms: float  # a layer's CPU rows device->host and the results back (fixed: latency, not bytes)
    join_ms: float = 0.0  # the host's own work per layer, which waits for the CPU's results (see place_misses);
    # the engine measures it as it runs (CpuTier.note_host_ms), the replay states it

    def cpu_expert_ms(self, tokens: int) -> float:
        """The CPU kernel's ms for one expert at `tokens` tokens: piecewise linear between the measured counts,
        and beyond the last one, proportional to tokens."""
        points = self.cpu_ms
        if tokens <= points[0][0]:
            return points[0][1]
        for (t0, ms0), (t1, ms1) in zip(points, points[1:]):
            if tokens <= t1:
                return ms0 + (ms1 - ms0) * (tokens - t0) / (t1 - t0)
        t_last, ms_last = points[-1]
        return ms_last * tokens / t_last


def place_misses(misses: Sequence[tuple[int, int]], costs: PlacementCosts | None, mode: str,
                 device_busy_ms: float = 0.0) -> set[int]:
    """The missed experts to compute on the CPU. `misses`: (expert, tokens routed to it) for the experts a layer
    call needs that are neither resident nor staged; `device_busy_ms`: device work already queued for the layer
    (its resident experts), which copied experts wait behind. `mode`: off (none), always (all), auto (balanced by
    `costs`; None: not calibrated, so none). The CPU's queue starts after the round trip and counts the host's
    `join_ms` once: the host joins the worker before its next layer's work, which a copied miss lets it overlap."""
    if mode == "off" or not misses:
        return set()
    if mode == "always":
        return {expert for expert, _ in misses}
    if costs is None:
        return set()
    link_end, device_end, cpu_end = 0.0, device_busy_ms, 0.0
    on_cpu: set[int] = set()
    for expert, tokens in sorted(misses, key=lambda m: (-m[1], m[0])):
        copied_end = max(device_end, link_end + costs.copy_ms) + costs.device_ms
        cpu_start = cpu_end if on_cpu else costs.round_trip_ms + costs.join_ms
        cpu_done = cpu_start + costs.cpu_expert_ms(tokens)
        if cpu_done < (1 - FREEZE_MARGIN) * copied_end:
            on_cpu.add(expert)
            cpu_end = cpu_done
        else:
            link_end += costs.copy_ms
            device_end = copied_end
    return on_cpu


def place_layer(order: Sequence[int], tokens: Mapping[int, int], is_miss: Callable[[int], bool],
                costs: PlacementCosts | None, mode: str) -> set[int]:
    """The experts of one layer call that the CPU computes: `order`, the call's distinct experts; `tokens`, how many
    tokens each is routed to; `is_miss(expert)`, whether it is neither resident nor staged. The resident ones'
    kernels (`costs.device_ms` each) are queued on the device first. The engine and the timed replay both ask this."""
    misses = [(expert, tokens[expert]) for expert in order if is_miss(expert)]
    resident_ms = (len(order) - len(misses)) * costs.device_ms if costs is not None else 0.0
    return place_misses(misses, costs, mode, resident_ms)
