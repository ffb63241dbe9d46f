"""Measurements for scripts/gpu_check.py: the expert cache's copies timed on their own streams, PCIe bandwidth,
kernel launches per layer, and how many kernel variants Triton has compiled."""

from __future__ import annotations

import time
from typing import Hashable

import torch

KINDS = ("copy-in", "write-back")


class TimedCopies:
    """Wraps an expert cache's streams so that each of its copies is timed where it runs: between two timing events
    recorded on the copy's own stream (CUDA), or on the host (CPU, where a copy is synchronous). Only the cache's
    copies pass through here: a copy into a device slot is a copy-in, one into a host slot a write-back. Other
    copies (the sampler's device-to-device clone, the routing reads) are not the cache's and are never counted."""

    def __init__(self, cache):
        self.cache, self.inner = cache, cache.streams
        self.cuda = cache.device.type == "cuda"
        self.records: list[tuple[str, object, object]] = []  # (kind, start, end)
        if self.cuda:  # everything timed runs after this event: elapsed times from it are never negative
            torch.cuda.synchronize(cache.device)
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()
        else:
            self.origin = time.perf_counter()

    @classmethod
    def attach(cls, cache) -> "TimedCopies":
        timed = cls(cache)
        cache.streams = timed
        return timed

    def detach(self) -> None:
        self.cache.streams = self.inner

    def __getattr__(self, name: str):  # compute, h2d, d2h, record, wait, ...: the wrapped streams'
        return getattr(self.inner, name)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream, dst_id: Hashable, src_id: Hashable) -> None:
        kind = "copy-in" if dst_id[0] == "slot" else "write-back"
        if not self.cuda:
            start = time.perf_counter()
            self.inner.copy(dst, src, stream, dst_id, src_id)
            self.records.append((kind, start, time.perf_counter()))
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        self.inner.copy(dst, src, stream, dst_id, src_id)
        end.record(stream)
        self.records.append((kind, start, end))

    def intervals(self) -> dict[str, list[tuple[float, float]]]:
        """Per kind, (start, end) of every copy in ms since `attach`."""
        if self.cuda:
            torch.cuda.synchronize(self.cache.device)
            since = lambda event: self.origin.elapsed_time(event)  # noqa: E731
        else:
            since = lambda t: (t - self.origin) * 1e3  # noqa: E731
        out = {kind: [] for kind in KINDS}
        for kind, start, end in self.records:
            out[kind].append((since(start), since(end)))
        return out

    def busy_ms(self) -> dict[str, float]:
        """Per kind, the time its stream spent copying (the union of its copies' intervals)."""
        return {kind: sum(end - start for start, end in union(spans)) for kind, spans in self.intervals().items()}


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def overlap_ms(intervals: dict[str, list[tuple[float, float]]]) -> float:
    """Time during which a copy-in and a write-back were both running."""
    total = 0.0
    for a_start, a_end in union(intervals["copy-in"]):
        for b_start, b_end in union(intervals["write-back"]):
            total += max(0.0, min(a_end, b_end) - max(a_start, b_start))
    return total


def measure_pcie(host: torch.Tensor, device: torch.device, repeats: int = 3) -> dict[str, float]:
    """GB/s of page-locked copies from `host` (uint8, pinned): host->device, device->host, and both at once on two
    streams (PCIe is full duplex), each over half of `host`."""
    half = host.numel() // 2
    source, target = host[:half], host[half: 2 * half]
    device_a, device_b = (torch.empty(half, dtype=torch.uint8, device=device) for _ in range(2))
    streams = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def timed(*copies) -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            for (dst, src), stream in zip(copies, streams):
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        return repeats * half * len(copies) / (time.perf_counter() - start) / 1e9

    device_b.copy_(source)
    return {"pcie_h2d_gbs": timed((device_a, source)), "pcie_d2h_gbs": timed((target, device_b)),
            "pcie_duplex_gbs": timed((device_a, source), (target, device_b))}


def kernel_launches_per_layer(engine, device: torch.device) -> float | None:
    """CUDA kernels (copies excluded) one decode step launches, per layer (None on the CPU)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    kv = DynamicCache(config=engine.model.config)
    with torch.inference_mode():
        engine.model(torch.tensor([[1, 2, 3, 4]]), kv)
        engine.model(torch.tensor([[5]]), kv)  # warm
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.model(torch.tensor([[6]]), kv)
            torch.cuda.synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not any(word in e.name for word in ("Memcpy", "Memset"))]
    return len(kernels) / engine.model.config.num_hidden_layers


def triton_compiles() -> int:
    """Kernel variants Triton has compiled so far in this process (0 under the interpreter, which compiles none)."""
    from offload_engine.kernels import triton_kernels

    total = 0
    for kernel in (triton_kernels._gemv, triton_kernels._qmm, triton_kernels._dequantize,
                   triton_kernels._sum_splits):
        for cache in getattr(kernel, "device_caches", {}).values():
            total += len(cache[0])
    return total
