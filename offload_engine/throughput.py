"""Throughput model: decode tokens/s of offloaded Mixtral from hit rates, expert bytes, bandwidths and compute time.

One decode token runs ``layers`` MoE layers with ``top_k`` experts each. With an expert of ``B`` bytes,
``th = B / h2d`` and ``td = B / d2h`` (effective pinned-memory bandwidths), hit rate ``h`` and ``k`` experts per layer
on the device, per token:

  C  compute     = traffic of the experts used and of the trunk (attention, KV-cache reads, lm_head) / HBM bandwidth
                   + a fixed host overhead (Python, kernel launches, one device->host read of the routing per layer).
                   Decode at batch 1 is memory-bound, so time = bytes moved / effective bandwidth.
  m  misses      = layers * top_k * (1 - h)
  prefetch       g guesses per layer, each naming an expert the layer uses with probability p (precision). A correct
                 guess of a non-resident expert turns a miss into a copy started one layer early:
                 covered = layers * g * p * (1 - h) (at most m). A wrong guess of a non-resident expert is a wasted
                 copy: wasted = layers * g * (1 - p) * q, with q = 1 - (k - top_k * h) / (E - top_k) the chance that
                 an expert the layer does not use is not resident. The oracle covers every miss (or those of layers
                 1+, as the simulator's) and wastes nothing.
  S  copy stream = (m + wasted) * th + m * td * writeback. The engine swaps: the host holds only the offloaded
                   experts, so every miss also writes its victim back. On one copy stream the two directions take
                   turns (the sum); ``duplex``: write-backs on a second stream use the other PCIe direction at the
                   same time, max of the two terms. The engine runs duplex since issue 15 (expert_cache.py);
                   ``duplex=False`` models the single-stream engine before it.
  T  = max(C + (m - covered) * th,  S)

i.e. a demand miss stalls compute for its host->device copy; prefetched copies and write-backs overlap compute but not
each other, so the copy stream's busy time bounds the token from below. Naive offloading (no cache: every expert
copied at every token, no write-back, no prefetch) is ``h = 0, writeback = False``: T = C + layers * top_k * th.

Compute traffic is counted, not guessed: :func:`expert_traffic` runs the engine's own ``expert_forward`` (and
``QuantLinear`` for attention) on meta tensors under a dispatch mode that sums the bytes every kernel reads and writes.
Kernel ``"engine"`` is the reference path (``kernels: reference``: dequantize the whole matrix with torch ops, then
matmul); ``"fused"`` is the engine's Triton GEMV (offload_engine.kernels), which reads only the packed bytes, plus
its split-K partial sums (``kernels.fused_traffic``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import MixtralConfig

from .config import EngineConfig, QuantSpec, load_config
from .experts import ExpertLayout, expert_forward
from .kernels import REFERENCE, fused_traffic
from .memory import GiB, plan_memory
from .quantize import MatrixLayout, QuantLinear

__all__ = ["GPU", "GPUS", "Prefetch", "NO_PREFETCH", "ORACLE", "Estimate", "CostModel", "estimate",
           "expert_traffic", "trunk_traffic", "cost_model", "auto_k", "simulated_hit_rate", "solve", "KERNELS"]

GB = 1e9
KERNELS = ("engine", "fused")


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


@dataclass(frozen=True)
class Prefetch:
    """Speculative prefetch: ``guesses`` experts per layer, each right with probability ``precision``."""

    guesses: int = 0
    precision: float = 0.0
    oracle: bool = False  # stage every miss (except ``first_layer=False``'s layer 0), waste nothing
    first_layer: bool = False  # the oracle can prefetch layer 0 too (the simulator's default: it cannot)

    @property
    def label(self) -> str:
        if self.oracle:
            return "oracle prefetch"
        return f"prefetch ({self.guesses}/layer, p={self.precision:.2f})" if self.guesses else "no prefetch"


NO_PREFETCH = Prefetch()
ORACLE = Prefetch(oracle=True)


@dataclass(frozen=True)
class Estimate:
    compute_s: float  # C
    misses: float  # expert copies host->device needed per token (demand + prefetched)
    covered: float  # ... of which started early by the prefetch
    wasted: float  # prefetched copies nobody used
    copy_stream_s: float  # S
    token_s: float  # T

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.token_s

    @property
    def exposed_copy_s(self) -> float:
        """Copy time the token waits for, beyond its compute."""
        return self.token_s - self.compute_s


def estimate(compute_s: float, expert_bytes: int, h2d: float, d2h: float, hit_rate: float, k: int, *,
             layers: int = 32, top_k: int = 2, num_experts: int = 8, writeback: bool = True,
             prefetch: Prefetch = NO_PREFETCH, duplex: bool = False) -> Estimate:
    """Seconds per decode token (see the module docstring for the formula). ``duplex``: write-backs run on a
    second stream in the other PCIe direction (full duplex), so S = max(host->device time, device->host time)."""
    if not 0.0 <= hit_rate <= 1.0:
        raise ValueError(f"hit_rate must be in [0, 1], got {hit_rate}")
    th, td = expert_bytes / h2d, expert_bytes / d2h
    miss_rate = 1.0 - hit_rate
    misses = layers * top_k * miss_rate
    if prefetch.oracle:
        covered = misses * (1.0 if prefetch.first_layer else (layers - 1) / layers)
        wasted = 0.0
    else:
        p = min(max(prefetch.precision, 0.0), 1.0)
        covered = min(misses, layers * prefetch.guesses * p * miss_rate)
        spare = num_experts - top_k  # experts a layer does not use
        unused_not_resident = 1.0 - (k - top_k * hit_rate) / spare if spare > 0 else 0.0
        wasted = layers * prefetch.guesses * (1.0 - p) * min(max(unused_not_resident, 0.0), 1.0)
    h2d_s, d2h_s = (misses + wasted) * th, (misses * td if writeback else 0.0)
    stream = max(h2d_s, d2h_s) if duplex else h2d_s + d2h_s
    token = max(compute_s + (misses - covered) * th, stream)
    return Estimate(compute_s, misses, covered, wasted, stream, token)


# ---- compute: bytes moved per token, counted on meta tensors ----
_VIEW_OPS = frozenset({"view", "_unsafe_view", "slice", "select", "detach", "t", "unsqueeze", "squeeze", "expand",
                       "reshape", "as_strided", "alias", "transpose", "permute", "empty", "lift_fresh", "split",
                       "unbind", "chunk", "narrow"})


class _TrafficCounter(TorchDispatchMode):
    """Sums the bytes each kernel reads (its tensor inputs) and writes (its outputs); views move nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _VIEW_OPS:
            return out
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        if name == "copy_":  # reads the source, writes the destination (which is also its "output")
            self.bytes += size(args[0]) + size(args[1])
        else:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes += sum(size(t) for t in tensors)
        self.kernels += 1
        return out


def traffic_bytes(fn: Callable, *args) -> int:
    """Device-memory bytes ``fn(*args)`` moves, if every kernel streams its operands once (meta tensors: no work)."""
    counter = _TrafficCounter()
    with counter:
        fn(*args)
    return counter.bytes


@functools.lru_cache(maxsize=None)
def expert_traffic(hidden: int, intermediate: int, spec: QuantSpec, dtype: torch.dtype, kernel: str = "engine",
                   sms: int = 40) -> int:
    """Bytes one expert moves for one token: with the reference kernels (``"engine"``, counted by running
    ``expert_forward`` on meta tensors) or with the fused ones (``"fused"``: the Triton GEMVs' reads and writes,
    split-K partial sums included, for a GPU with ``sms`` SMs, plus the SwiGLU's elementwise traffic)."""
    layout = ExpertLayout.build(hidden, intermediate, spec, dtype)
    if kernel == "fused":
        swiglu = 5 * intermediate * dtype.itemsize  # silu(gate): read + write; * up: read 2, write 1
        return sum(fused_traffic(m, 1, sms) for m in layout.matrices.values()) + swiglu
    if kernel != "engine":
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device="meta")
    x = torch.empty(1, hidden, dtype=dtype, device="meta")
    return traffic_bytes(expert_forward, layout, buffer, x, REFERENCE)


def _head_dim(hf: MixtralConfig) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def trunk_traffic(hf: MixtralConfig, cfg: EngineConfig, context: int, kernel: str = "engine") -> int:
    """Bytes the non-expert part of one decode token moves: attention projections, KV-cache reads at ``context``
    tokens, routers and lm_head (norms, rotary and the embedding row are negligible)."""
    H, dtype = hf.hidden_size, cfg.torch_dtype
    q_out, kv_out = hf.num_attention_heads * _head_dim(hf), hf.num_key_value_heads * _head_dim(hf)
    shapes = [(q_out, H), (kv_out, H), (kv_out, H), (H, q_out)]
    attention = 0
    for shape in shapes:
        layout = MatrixLayout.build(shape, cfg.quant.attention, dtype)
        if layout.spec.bits is None:
            attention += layout.nbytes
        elif kernel == "fused":
            attention += fused_traffic(layout)
        else:
            linear = QuantLinear(layout, torch.empty(layout.nbytes, dtype=torch.uint8, device="meta"), REFERENCE)
            attention += traffic_bytes(linear, torch.empty(1, shape[1], dtype=dtype, device="meta"))
    kv_read = 2 * kv_out * context * dtype.itemsize
    router = hf.num_local_experts * H * dtype.itemsize
    lm_head = hf.vocab_size * H * dtype.itemsize
    return hf.num_hidden_layers * (attention + kv_read + router) + lm_head


@dataclass(frozen=True)
class CostModel:
    """Per-token compute inputs for :func:`estimate`, for one model, config, kernel and GPU."""

    expert_bytes: int  # packed expert: what a copy moves
    expert_traffic: int  # device-memory bytes of one expert's decode step
    trunk_traffic: int  # per token
    host_overhead_s: float  # per token
    hbm: float
    lookups: int  # experts used per token (layers * top_k)

    @property
    def compute_s(self) -> float:
        return (self.lookups * self.expert_traffic + self.trunk_traffic) / self.hbm + self.host_overhead_s


def cost_model(gpu: GPU, cfg: EngineConfig, hf: Optional[MixtralConfig] = None, *, kernel: str = "engine",
               context: int = 512, host_overhead_per_layer_s: float = 0.5e-3) -> CostModel:
    """Compute costs of Mixtral (``hf``, default Mixtral-8x7B shapes) under ``cfg`` on ``gpu``.

    ``context``: average tokens in the KV cache while decoding. ``host_overhead_per_layer_s``: Python, kernel
    launches and the per-layer routing read (an assumption; the profiler measures it on a real machine)."""
    hf = hf or MixtralConfig()
    spec, dtype = cfg.quant.experts, cfg.torch_dtype
    layout = ExpertLayout.build(hf.hidden_size, hf.intermediate_size, spec, dtype)
    return CostModel(layout.nbytes, expert_traffic(hf.hidden_size, hf.intermediate_size, spec, dtype, kernel),
                     trunk_traffic(hf, cfg, context, kernel), hf.num_hidden_layers * host_overhead_per_layer_s,
                     gpu.hbm, hf.num_hidden_layers * hf.num_experts_per_tok)


def auto_k(gpu: GPU, cfg: EngineConfig | str, hf: Optional[MixtralConfig] = None) -> int:
    """The experts per layer that ``experts_on_device: auto`` would choose on ``gpu`` (memory.plan_memory)."""
    cfg = load_config(cfg) if not isinstance(cfg, EngineConfig) else cfg
    cfg = cfg.replace(experts_on_device="auto")
    return plan_memory(hf or MixtralConfig(), cfg, gpu.free_bytes).experts_on_device


@functools.lru_cache(maxsize=None)
def _shared_traces() -> tuple:
    from .simulate import default_trace_paths, load_traces

    paths = default_trace_paths()
    if not paths:
        raise FileNotFoundError("no shared routing traces (../shared/data/routing/*.npz): pass hit rates explicitly")
    return tuple(load_traces(*paths).items())


@functools.lru_cache(maxsize=None)
def simulated_hit_rate(k: int, policy: str = "lru") -> float:
    """Hit rate on the shared real Mixtral traces, replayed with the engine's semantics (each layer starts warm with
    experts 0..k-1; only the experts still to come in the layer call are protected)."""
    from .simulate import replay_many

    return replay_many(dict(_shared_traces()), k, policy, warm=True, protect_used=False).hit_rate


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


def with_bandwidth(gpu: GPU, h2d: float, d2h: Optional[float] = None) -> GPU:
    return replace(gpu, h2d=h2d, d2h=h2d if d2h is None else d2h)


def model_costs(cfg: EngineConfig, hf: Optional[MixtralConfig] = None, *, context: int = 512,
                sms: int = 40) -> "ModelCosts":
    """What a decode step of Mixtral (``hf``, default Mixtral-8x7B shapes) under ``cfg`` moves, with the fused
    kernels, for the timed replay (replay.ModelCosts)."""
    from .replay import ModelCosts

    hf = hf or MixtralConfig()
    spec, dtype = cfg.quant.experts, cfg.torch_dtype
    layout = ExpertLayout.build(hf.hidden_size, hf.intermediate_size, spec, dtype)

    def expert(tokens: int) -> int:
        swiglu = 5 * hf.intermediate_size * dtype.itemsize * tokens
        return sum(fused_traffic(m, tokens, sms) for m in layout.matrices.values()) + swiglu

    lm_head = hf.vocab_size * hf.hidden_size * dtype.itemsize
    trunk = trunk_traffic(hf, cfg, 0, "fused") - lm_head
    kv = (trunk_traffic(hf, cfg, context, "fused") - lm_head - trunk) // hf.num_hidden_layers
    return ModelCosts(layout.nbytes, expert(1), expert(2) - expert(1), trunk // hf.num_hidden_layers, kv, lm_head)
