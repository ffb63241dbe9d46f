"""Decode throughput of offloaded MoE models on stated GPUs, modelled by the timed replay of the engine's own
expert cache (replay.py) over real routing traces.

This replaces a closed formula, T = max(compute + demand copies, copy stream), which assumed overlaps the code did
not deliver (copy-ins and write-backs taking turns, prefetch copies in front of demand copies, the host's work
beside the copies rather than before each routing read): it modelled 8.48 tok/s for the T4 where a replay of the
code as it then was gives 4.6. Every figure published now is "modelled (timed replay of the engine's cache)".

Inputs, each stated where a figure is printed: the GPU (`GPUS`: pinned PCIe rates, the device-memory bandwidth
bandwidth-bound kernels reach, the free memory `auto` plans against), the host RAM (`offload.write_back: auto`),
the host's time per layer, the guesses' precision, and what a decode step moves (`costs_of`, counted from the
byte layouts: one expert's packed bytes, the fused kernels' traffic, the trunk's weights per layer, KV-cache
reads, the lm_head).

Hybrid execution (issue 23) adds a CPU (`CPUS`): the CPU kernel's ms per expert in the model's dtype, taken from
this machine's measurement (BENCHMARKS §1) and scaled to the profile (`CPU.expert_ms`), the host's own ms per
layer, and whether the kernel's threads leave the host thread a core of its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import numpy as np
from transformers import MixtralConfig

from .anatomy import Anatomy
from .config import EngineConfig, load_config
from .kernels import fused_traffic
from .memory import GiB, MemoryPlan, kv_cache_bytes, plan_memory
from .replay import CpuSpeeds, ModelCosts, ReplayResult, Speeds, replay_engine

__all__ = ["GPU", "GPUS", "CPU", "CPUS", "MEASURED_CPU", "HOST_RAM", "costs_of", "speeds_of", "cpu_tier", "plan_on",
           "auto_k", "shared_traces", "modelled", "break_even_precision", "solve"]

GB = 1e9


@dataclass(frozen=True)
class GPU:
    """A GPU as the model sees it. Bandwidths are effective (what copies/kernels achieve), in bytes/s."""

    name: str
    link: str
    free_bytes: int  # device memory free after the CUDA context: what `auto` plans against
    h2d: float  # pinned host->device
    d2h: float  # pinned device->host
    hbm: float  # device memory, bandwidth-bound kernels
    why: str  # where the numbers come from


# PCIe gen3 x16: 8 GT/s x 16 lanes x 128/130 = 15.75 GB/s raw; packet headers (TLP/DLLP, 256-byte payloads) leave
# ~13 GB/s, and CUDA's bandwidthTest on gen3 x16 hosts measures ~11-12.5 GB/s with pinned memory; we take 11.5.
# Gen4 x16 doubles the raw rate (31.5 GB/s); pinned copies typically measure 24-26 GB/s; we take 24.
# HBM/GDDR: bandwidth-bound kernels reach ~75 % of the datasheet figure on these consumer/inference parts.
GPUS: dict[str, GPU] = {
    "t4": GPU("Tesla T4 16 GB (Colab)", "PCIe gen3 x16", int(14.5 * GiB), 11.5 * GB, 11.5 * GB, 0.75 * 320 * GB,
              "15.75 GB/s raw gen3 x16 -> 11.5 GB/s pinned (typical bandwidthTest); 320 GB/s GDDR6 x 0.75"),
    "rtx3060": GPU("RTX 3060 12 GB", "PCIe gen4 x16", int(11.3 * GiB), 24 * GB, 24 * GB, 0.75 * 360 * GB,
                   "31.5 GB/s raw gen4 x16 -> 24 GB/s pinned; 360 GB/s GDDR6 x 0.75; ~0.7 GiB for context, display"),
    "rtx3090": GPU("RTX 3090 24 GB", "PCIe gen4 x16", int(23.2 * GiB), 24 * GB, 24 * GB, 0.75 * 936 * GB,
                   "31.5 GB/s raw gen4 x16 -> 24 GB/s pinned; 936 GB/s GDDR6X x 0.75"),
    "rtx4090": GPU("RTX 4090 24 GB", "PCIe gen4 x16", int(23.2 * GiB), 24 * GB, 24 * GB, 0.75 * 1008 * GB,
                   "31.5 GB/s raw gen4 x16 -> 24 GB/s pinned; 1008 GB/s GDDR6X x 0.75"),
}


# The CPU kernel measured on this machine (BENCHMARKS §1, `python scripts/bench_kernels.py --sweep --repeats 31
# --threads 2`, AVX2 with OFFLOAD_ENGINE_CXXFLAGS=-mno-avx512f: AMD EPYC Zen 4 VM, 2 cores, medians, load 0.8-1.2):
# a whole 2-bit g16 Mixtral expert (66.4 MB packed) with float16 activations (a T4's dtype, the packaged configs';
# the int16 path), ms at 1/2/3/4 tokens, per vector ISA build. A float32 torch.sum read 28-37 GB/s on those 2
# threads: at 1 token the kernel (23 GB/s) nears memory speed, at 2-4 tokens its instructions bound it.
MEASURED_CPU = {"cores": 2, "expert_bytes": 66_404_400, "read_gbps": 31.0,
                "float16_ms": {"avx512": (2.86, 4.16, 5.41, 7.15), "avx2": (4.27, 6.41, 10.15, 12.78)},
                "host_ms_per_layer": 0.5}


@dataclass(frozen=True)
class CPU:
    """A host CPU as the model sees it: the CPU kernel scaled from this machine's measurement (a roofline: the
    instruction-bound time divided by cores x per-core speed, but never below the expert's bytes over the
    memory read bandwidth), and the host thread's own speed."""

    name: str
    isa: str  # which of this machine's builds it runs: "avx512" or "avx2"
    cores: float  # cores the kernel's threads run on (hyperthreads of one core count as one)
    core_speed: float  # per core and cycle-throughput, relative to this machine's cores (clock ratio, stated)
    read_gbps: float  # memory read bandwidth a multi-threaded stream reaches
    host_ms_per_layer: float  # the host's own work per MoE layer (this machine: 0.5 ms, issue 20), scaled
    oversubscribed: bool  # the kernel's threads take every hardware thread: the host thread preempts one
    host_ram: str  # its machine's RAM (a HOST_RAM key): the write-back mode it gets
    why: str

    def expert_ms(self, expert_bytes: int = MEASURED_CPU["expert_bytes"]) -> tuple[tuple[int, float], ...]:
        """(tokens, ms) for one expert of `expert_bytes` packed bytes in float16, at 1-4 tokens."""
        scale = expert_bytes / MEASURED_CPU["expert_bytes"]  # instructions and bytes both go with the weights
        floor = 1e3 * expert_bytes / (self.read_gbps * GB)
        return tuple((t, max(scale * ms * MEASURED_CPU["cores"] / (self.cores * self.core_speed), floor))
                      for t, ms in enumerate(MEASURED_CPU["float16_ms"][self.isa], start=1))


# Stated assumptions (no such machine here): the CPUs' clocks, core counts and memory from their vendors' data, the
# read bandwidth as ~75-80 % of the channels' peak (what STREAM-like reads reach on desktops), and this VM's Zen 4
# cores taken at ~3.5 GHz under load. The host's ms per layer goes with single-thread speed.
CPUS: dict[str, CPU] = {
    "colab": CPU("Colab, 2 vCPUs (Xeon @ 2.2 GHz, AVX2)", "avx2", 1.0, 2.2 / 3.5, 12.0, 1.0, True,
                 "Colab (12.7 GB)",
                 "lscpu on Colab: 1 core x 2 threads, Intel Xeon @ 2.20 GHz (Broadwell: AVX2, no AVX-512); kernel on "
                 "2 hyperthreads = 1 core at 0.63x this VM's; ~12 GB/s one core's read bandwidth (assumed); host "
                 "1.0 ms/layer (issue 20: 1-1.5 ms likely)"),
    "desktop8": CPU("8-core DDR4 desktop (Ryzen 7 5800X class, AVX2)", "avx2", 8.0, 4.4 / 3.5, 40.0, 0.4, False,
                    "desktop (32 GB)",
                    "8 cores at ~4.4 GHz all-core, AVX2; DDR4-3200 dual channel 51.2 GB/s peak -> 40 GB/s read; 16 "
                    "hardware threads leave the host thread its own; host 0.4 ms/layer (~4.7 GHz single thread)"),
    "ddr5-16": CPU("16-core DDR5 desktop (Ryzen 9 7950X class, AVX-512)", "avx512", 16.0, 5.0 / 3.5, 64.0, 0.3,
                   False, "desktop (32 GB)",
                   "16 Zen 4 cores at ~5 GHz all-core, AVX-512; DDR5-5600 dual channel 89.6 GB/s peak -> ~64 GB/s "
                   "read (Zen 4's fabric caps reads); host 0.3 ms/layer (~5.7 GHz single thread)"),
    "colab-fast": CPU("Colab's 2 vCPUs at this VM's speed (upper bound)", "avx2", 2.0, 1.0, 31.0, 1.0, True,
                      "Colab (12.7 GB)",
                      "as if Colab's 2 vCPUs were this VM's 2 Zen 4 cores (AVX2 build, 4.3 ms per expert): the CPU a "
                      "little faster than a T4's copy (5.8 ms), where placement could lose; host 1.0 ms/layer"),
}
# A CPU tier's remaining inputs (assumed; the engine calibrates them at load): a layer's CPU rows of x device->host
# and the results back, with the worker thread's wake-up; the host thread's own share of a hand-over (gather the
# rows, submit, join, queue the results' copy and add: ~10 torch ops), as a share of its ms per layer.
ROUND_TRIP_MS = 0.1
HAND_OVER_SHARE = 0.2


# Host RAM available to the process (MemAvailable), for `offload.write_back: auto`.
HOST_RAM = {"Colab (12.7 GB)": 12.7e9, "Kaggle T4 VM (29 GB)": 29e9, "desktop (32 GB)": 32e9}


def costs_of(hf, cfg: EngineConfig, *, context: int = 512, sms: int = 40) -> ModelCosts:
    """What one decode step of the model `hf` (a transformers config) under `cfg` moves with the fused kernels on
    a GPU with `sms` SMs, at `context` tokens of KV cache per sequence."""
    anatomy = Anatomy.of(hf, cfg.torch_dtype)
    layout = anatomy.expert_layout(cfg)
    moe_layers = len(anatomy.moe_layers)

    def expert(tokens: int) -> int:  # the three GEMVs' reads and writes + SwiGLU's elementwise traffic
        swiglu = 5 * anatomy.expert_intermediate * cfg.torch_dtype.itemsize * tokens
        return sum(fused_traffic(m, tokens, sms) for m in layout.matrices.values()) + swiglu

    def read(t) -> int:  # a packed matrix streams its bytes once per step; the embedding reads one row
        return 0 if "embed" in t.name else t.nbytes(cfg)

    in_layers = sum(read(t) for t in anatomy.trunk if t.layer is not None)
    head = sum(read(t) for t in anatomy.trunk if t.layer is None)
    kv = kv_cache_bytes(hf, cfg, context) // moe_layers
    return ModelCosts(layout.nbytes, expert(1), expert(2) - expert(1), in_layers // moe_layers, kv, head)


def speeds_of(gpu: GPU, **overrides) -> Speeds:
    """The replay's machine inputs for `gpu`; `overrides` are other `Speeds` fields (host_ms_per_layer, ...)."""
    return Speeds(**{"h2d_gbps": gpu.h2d / GB, "d2h_gbps": gpu.d2h / GB, "kernel_gbps": gpu.hbm / GB, **overrides})


def cpu_tier(cpu: CPU, mode: str, expert_bytes: int = MEASURED_CPU["expert_bytes"]) -> CpuSpeeds:
    """The replay's CPU tier for `cpu` at `offload.cpu_compute: mode`."""
    return CpuSpeeds(cpu.expert_ms(expert_bytes), ROUND_TRIP_MS, HAND_OVER_SHARE * cpu.host_ms_per_layer,
                   cpu.oversubscribed, mode)


def plan_on(gpu: GPU, cfg: EngineConfig | str, hf=None, host_bytes: Optional[float] = None) -> MemoryPlan:
    """The memory plan the engine would make on `gpu` (k, write-back mode) with `host_bytes` of RAM available."""
    cfg = load_config(cfg) if not isinstance(cfg, EngineConfig) else cfg
    return plan_memory(hf or MixtralConfig(), cfg, gpu.free_bytes,
                       host_free_bytes=None if host_bytes is None else int(host_bytes))


def auto_k(gpu: GPU, cfg: EngineConfig | str, hf=None) -> int:
    """The experts per layer that ``experts_on_device: auto`` would choose on ``gpu`` (memory.plan_memory)."""
    cfg = load_config(cfg) if not isinstance(cfg, EngineConfig) else cfg
    return plan_on(gpu, cfg.replace(experts_on_device="auto"), hf).experts_on_device


def shared_traces() -> dict[str, np.ndarray]:
    """The shared real Mixtral-8x7B routing traces (../shared/data/routing/*.npz beside a checkout)."""
    from .simulate import default_trace_paths, load_traces

    paths = default_trace_paths()
    if not paths:
        raise FileNotFoundError("no routing traces given and no shared ones (../shared/data/routing/*.npz): record "
                                "your model's with `python scripts/profile_cache.py MODEL --out report.json` and pass "
                                "report.json")
    return load_traces(*paths)


def modelled(traces: Mapping[str, np.ndarray], costs: ModelCosts, speeds: Speeds, cfg: EngineConfig, k: int,
             write_back: bool, *, batch: int = 1, prefetch: Optional[int] = None,
             min_precision: Optional[float] = None, cpu: Optional[CpuSpeeds] = None) -> ReplayResult:
    """The timed replay at `k` experts per layer and `cfg`'s prefetch settings (or those given); `cpu`: the CPU
    tier (None: copy-only)."""
    off = cfg.offload
    return replay_engine(traces, costs, speeds, k=k, prefetch=off.prefetch if prefetch is None else prefetch,
                         policy=off.policy, write_back=write_back,
                         min_precision=off.prefetch_min_precision if min_precision is None else min_precision,
                         batch=batch, cpu=cpu)


def break_even_precision(rate: Callable[[float], float], baseline: float, iters: int = 6) -> Optional[float]:
    """The lowest guess precision at which `rate(precision)` (tokens/s with every guess copied) reaches
    `baseline` (prefetch off), to within 2^-iters of [0.5, 1]; None if even perfect guesses do not."""
    return solve(rate, baseline, 0.5, 1.0, iters)


def solve(f: Callable[[float], float], target: float, lo: float, hi: float, iters: int = 60) -> Optional[float]:
    """The smallest x in [lo, hi] with f(x) >= target, for f non-decreasing; None if f(hi) < target."""
    if f(hi) < target:
        return None
    if f(lo) >= target:
        return lo
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return hi


def with_speeds(speeds: Speeds, **changes) -> Speeds:
    return dataclasses.replace(speeds, **changes)
