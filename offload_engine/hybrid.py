"""Hybrid execution's runtime: the CPU as a second compute tier for missed experts (`offload.cpu_compute`).

`CpuTier` holds what the engine needs beside the cache: the mode, the costs measured at load (`calibrate`), the
CPU kernels and the worker thread. Per layer call the model asks it which misses the CPU computes (`place`, the
policy of placement.py) and has it run them (`start`): the tokens' rows of x go device->host in one transfer,
the worker runs each expert from its host slot, and the returned function waits for the results, brings them
back in one transfer and hands each expert's rows to the model, which adds them in its usual order.

Static placement (`offload.cpu_layers`, `StaticExperts`): the first N MoE layers' routed experts live only in host
RAM and every one of their experts runs on the CPU tier, through the same `schedule.run_layer`.

Modes: off (every miss copied), always (every miss on the CPU, on a CPU device too: there the cache's device and
host slots are both host memory, and the misses still go through the worker thread), auto (calibrated on CUDA;
on a CPU device the device *is* the CPU, so auto computes nothing apart and says so).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import torch

from .cache_stats import LayerStats
from .cpu_worker import CpuWorker
from .placement import PlacementCosts, place_layer

CALIBRATION_TOKENS = (1, 2, 4, 8)
ExpertOnCpu = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (host slot, rows [n, H]) -> [n, H]


class CpuTier:
    def __init__(self, mode: str, device: torch.device, threads: int | None = None,
                 costs: PlacementCosts | None = None, note: str = "", static: bool = False):
        self.mode, self.device, self.costs = mode, torch.device(device), costs
        self.note = note  # why auto computes nothing apart, or where the costs came from
        # static: some layers' experts always run on the CPU (offload.cpu_layers), whatever the mode
        self.worker = CpuWorker(threads) if mode != "off" or static else None

    @property
    def active(self) -> bool:
        return self.mode == "always" or (self.mode == "auto" and self.costs is not None)

    def calibration(self) -> dict | None:
        """The measured (or given) costs as plain data, None if there are none."""
        c = self.costs
        if c is None:
            return None
        return {"copy_ms": c.copy_ms, "device_ms": c.device_ms, "cpu_ms": {t: ms for t, ms in c.cpu_ms},
                "round_trip_ms": c.round_trip_ms, "host_ms_per_layer": c.join_ms}

    def describe(self) -> str:
        """One line for the load line and stats(): the mode and, for auto, the calibration."""
        if self.mode != "auto" or self.costs is None:
            return self.mode + (f" ({self.note})" if self.note else "")
        c = self.costs
        cpu = ", ".join(f"{t} tok {ms:.2f} ms" for t, ms in c.cpu_ms)
        return (f"auto (copy {c.copy_ms:.2f} ms/expert, device {c.device_ms:.2f} ms/expert, CPU {cpu}, "
                f"round trip {c.round_trip_ms:.2f} ms, host {c.join_ms:.2f} ms/layer)")

    def note_host_ms(self, ms: float) -> None:
        """The host's own work between two layer calls, measured as the model runs: a running mean becomes
        placement's `join_ms` (a layer with CPU experts holds the host until their results are back)."""
        if self.mode == "auto" and self.costs is not None:
            join_ms = ms if self.costs.join_ms == 0.0 else 0.9 * self.costs.join_ms + 0.1 * ms
            self.costs = dataclasses.replace(self.costs, join_ms=join_ms)

    def place(self, cache, layer: int, tokens: dict[int, int], order: Sequence[int]) -> set[int]:
        """The misses of this layer call that the CPU computes (`tokens`: expert -> tokens routed to it)."""
        if not self.active:
            return set()
        return place_layer(order, tokens, lambda expert: cache.is_miss(layer, expert), self.costs, self.mode)

    def start(self, cache, layer: int, jobs: list[tuple[int, torch.Tensor]], rows: Callable[[int], torch.Tensor],
              run: ExpertOnCpu, deliver: Callable[[int, torch.Tensor], None], on_sync: Callable[[], None]):
        """Start the CPU experts `jobs` ([(expert, its host slot)]) on the worker. `rows(expert)`: its tokens' rows
        of x on the device [n, H]; `deliver(expert, y)`: its result [n, H], on the device. Returns the function
        that waits for the results (one host sync, counted by `on_sync`) and delivers them in `jobs`' order."""
        parts = [rows(expert) for expert, _ in jobs]  # [n, H] each
        sizes = [0]
        for part in parts:
            sizes.append(sizes[-1] + part.shape[0])
        if self.device.type == "cuda":
            x = torch.cat(parts) if len(parts) > 1 else parts[0]  # [N, H]: every CPU expert's rows, one transfer
            host_x = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            host_x.copy_(x, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            parts = [host_x[sizes[i] : sizes[i + 1]] for i in range(len(jobs))]
        else:
            ready = None  # already host memory: the rows as gathered, nothing moves

        def work() -> torch.Tensor:
            if ready is not None:
                ready.synchronize()  # the rows have reached the host (the worker waits, not the main thread)
            ys = [run(host, part) for (_, host), part in zip(jobs, parts)]
            return torch.cat(ys) if len(ys) > 1 else ys[0]

        job = self.worker.submit(work)
        cache.cpu_jobs.append(job)

        def finish() -> None:
            y, seconds = job.result()  # [N, H] on the host; raises what the worker raised
            cache.cpu_jobs.remove(job)
            on_sync()
            cache.stats[layer].cpu_ms += 1000 * seconds
            y = y.to(self.device, non_blocking=True)  # one transfer back
            for i, (expert, _) in enumerate(jobs):
                deliver(expert, y[sizes[i] : sizes[i + 1]])

        return finish

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


class StaticExperts:
    """The routed experts of the first `num_layers` MoE layers (offload.cpu_layers): [N, E, nbytes] in host RAM,
    written once at load, only ever read by the CPU. A layer call runs all of its experts on the CPU tier through
    `schedule.run_layer`, for which this offers the calls such a layer call makes on a cache. Each expert used
    counts as a lookup and a miss (it is not on the device) computed on the CPU, like a hybrid miss."""

    def __init__(self, num_layers: int, num_experts: int, expert_nbytes: int, cpu_jobs: list):
        self.num_layers = num_layers
        self.host = torch.empty(num_layers, num_experts, expert_nbytes, dtype=torch.uint8)  # pageable: never copied
        self.stats = [LayerStats() for _ in range(num_layers)]
        self.cpu_jobs = cpu_jobs  # the cache's list: its recover() settles a job interrupted here too

    def fill(self, layer: int, expert: int, write: Callable[[torch.Tensor], None]) -> None:
        write(self.host[layer][expert])

    def begin_layer(self, layer: int, needed: Sequence[int]) -> None:
        pass

    def end_layer(self, layer: int) -> None:
        pass

    def lend_host(self, layer: int, expert: int) -> torch.Tensor:
        stats = self.stats[layer]
        stats.lookups += 1
        stats.misses += 1
        stats.cpu_computed += 1
        return self.host[layer][expert]

    def cpu_computed(self, layer: int, expert: int) -> None:
        pass  # nothing ever writes these bytes after loading: no ordering to record

    def reset_stats(self) -> None:
        self.stats = [LayerStats() for _ in range(self.num_layers)]

    def host_bytes(self) -> int:
        return self.host.numel()


class OrderedSum:
    """Adds each expert's contribution in `order` (the copy path's summation order, so that results match it)
    whatever order they arrive in: one that arrives before an earlier expert's is held until that one has come.
    Without CPU experts every contribution arrives in order and is added at once."""

    def __init__(self, order: Sequence[int], add: Callable[[int, torch.Tensor], None]):
        self.order, self.add, self.held, self.next = list(order), add, {}, 0

    def put(self, expert: int, y: torch.Tensor) -> None:
        self.held[expert] = y
        while self.next < len(self.order) and self.order[self.next] in self.held:
            expert = self.order[self.next]
            self.add(expert, self.held.pop(expert))
            self.next += 1


def calibrate(cache, run_device: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], run_cpu: ExpertOnCpu,
              worker: CpuWorker, hidden_size: int, dtype: torch.dtype, device: torch.device,
              repeats: int = 3) -> PlacementCosts:
    """Measure the costs placement weighs, on this machine (CUDA): one real expert copied host->device, the CPU
    kernel on a real host slot at 1, 2, 4, 8 tokens (on the worker thread, with its thread count), the device's
    kernels for one expert at one token, and a small device->host->device round trip. Each the best of `repeats`
    after a warm-up."""
    host = cache.host[0][0]
    slot = cache.slots[cache.free_slots[0]]  # a spare slot: nothing lives there between layer calls

    def best(fn: Callable[[], object], sync: bool) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if sync:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if sync:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return 1000 * min(times)

    copy_ms = best(lambda: slot.copy_(host, non_blocking=True), sync=True)
    x = torch.randn(1, hidden_size, dtype=dtype, device=device)
    device_ms = best(lambda: run_device(slot, x), sync=True)
    xs = {t: torch.randn(t, hidden_size).to(dtype) for t in CALIBRATION_TOKENS}  # [t, H] on the host
    cpu_ms = worker.submit(lambda: tuple((t, best(lambda t=t: run_cpu(host, xs[t]), sync=False))
                                         for t in CALIBRATION_TOKENS)).result()[0]
    round_trip_ms = best(lambda: x.cpu().to(device), sync=True)
    return PlacementCosts(copy_ms, device_ms, cpu_ms, round_trip_ms)
