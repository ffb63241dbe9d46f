"""Memory arithmetic: how many experts per layer fit beside the trunk, the KV cache and a working margin on the
device, whether the offloaded rest fits the host's RAM (page-locked) beside the process itself, and whether the
host can keep a copy of every expert, so that evicted experts are dropped instead of written back
(`offload.write_back`).

Everything is computed from shapes and the byte layouts (the expert cache's own `CacheAllocation`), before
anything is allocated, so that asking for more than fits is an error up front rather than an out-of-memory
crash, or a host swapping itself to death, halfway through loading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .anatomy import Anatomy
from .config import EngineConfig
from .cache_allocation import CacheAllocation

GiB = 1024**3
# CUDA context, allocator fragmentation, activations and one expert's dequantized matrices at a time.
BASE_MARGIN = int(0.75 * GiB)
# Pageable host memory besides the pinned expert slots: Python, torch and the CUDA runtime's host side, the
# tokenizer, and the loader's transient buffers (one tensor at a time; source shards are unmapped per expert).
HOST_MARGIN = 2 * GiB
# The generate loop (batch.py) prefills at most this many prompt tokens per forward, so that a prefill's
# activations, and its pause of the sequences decoding beside it, stay bounded whatever the prompt's length.
PREFILL_CHUNK = 512
# Sequences generated at once by default (Engine.generate with a list; offload-serve --max-batch, memory permitting).
MAX_BATCH = 8


class NotEnoughMemory(MemoryError):
    pass


@dataclass(frozen=True)
class MemoryPlan:
    experts_on_device: int  # per layer
    expert_bytes: int  # one packed expert
    trunk_bytes: int  # embeddings, lm_head, norms, routers, attention
    kv_cache_bytes: int  # for `context` tokens, times `sequences`
    spare_bytes: int  # the cache's shared spare slots
    margin_bytes: int
    total_bytes: int  # everything above with `experts_on_device` experts per layer
    context: int
    prefill_bytes: int = 0  # a forward's working memory: a prefill chunk beside `sequences` - 1 decoding
    sequences: int = 1  # sequences generated at once (offload-serve --max-batch), each with its KV cache
    host_pinned_bytes: int = 0  # the experts kept in host RAM, page-locked at their exact size
    host_margin_bytes: int = HOST_MARGIN  # pageable: the process itself
    write_back: bool = True  # evicted experts are written back (swap); False: the host keeps every expert
    cpu_layers: int = 0  # MoE layers whose experts stay in host RAM, computed on the CPU (offload.cpu_layers)
    host_static_bytes: int = 0  # their experts (pageable: the CPU reads them, nothing copies them)

    @property
    def write_back_mode(self) -> str:
        """What `offload.write_back` resolves to ("always" or "never")."""
        return "always" if self.write_back else "never"

    @property
    def host_total_bytes(self) -> int:
        return self.host_pinned_bytes + self.host_static_bytes + self.host_margin_bytes

    def summary(self) -> str:
        g = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
        return (f"{self.experts_on_device} experts/layer x {self.expert_bytes / 2**20:.1f} MiB; trunk {g(self.trunk_bytes)}, "
                f"KV cache ({self.sequences} x {self.context} tokens) {g(self.kv_cache_bytes)}, prefill "
                f"{g(self.prefill_bytes)}, spare slots {g(self.spare_bytes)}, "
                f"margin {g(self.margin_bytes)}; total {g(self.total_bytes)}; host RAM {g(self.host_pinned_bytes)} "
                f"pinned + {g(self.host_margin_bytes)} process = {g(self.host_total_bytes)}; write-backs: "
                f"{'yes (swap)' if self.write_back else 'no (every expert in host RAM)'}"
                + (f"; the first {self.cpu_layers} MoE layers' experts on the CPU ({g(self.host_static_bytes)} "
                   f"of host RAM, never copied)" if self.cpu_layers else ""))


def trunk_bytes(hf, cfg: EngineConfig) -> int:
    """Embeddings, lm_head, norms, routers, attention, shared experts and dense MLPs, as the loader stores them."""
    return Anatomy.of(hf, cfg.torch_dtype).trunk_bytes(cfg)


def kv_cache_bytes(hf, cfg: EngineConfig, context: int) -> int:
    """Keys and values of `context` tokens in every layer, as transformers' DynamicCache holds them: MLA
    (DeepSeek) caches decompressed per-head keys [qk_nope + qk_rope] and values [v_head_dim]; a sliding-window layer
    (GPT-OSS) keeps at most its window."""
    if getattr(hf, "kv_lora_rank", None):
        per_token = hf.num_attention_heads * (hf.qk_nope_head_dim + hf.qk_rope_head_dim + hf.v_head_dim)
    else:
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        per_token = 2 * hf.num_key_value_heads * head_dim
    kinds = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
    window = getattr(hf, "sliding_window", None) or context
    tokens = sum(min(context, window) if kind == "sliding_attention" else context for kind in kinds)
    return per_token * tokens * cfg.torch_dtype.itemsize


def _attention_dims(hf) -> tuple[int, int, int, int]:
    """(query heads, key/value heads as cached, key head dim, value head dim); MLA expands its latents per head."""
    if getattr(hf, "kv_lora_rank", None):
        heads = hf.num_attention_heads
        return heads, heads, hf.qk_nope_head_dim + hf.qk_rope_head_dim, hf.v_head_dim
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return hf.num_attention_heads, hf.num_key_value_heads, head_dim, head_dim


def prefill_bytes(hf, cfg: EngineConfig, context: int | None = None, sequences: int = 1,
                  chunk: int = PREFILL_CHUNK) -> int:
    """Peak working memory of one forward at `context` tokens (beside the weights and the KV cache): a prefill
    chunk of `chunk` tokens plus one token each of `sequences` - 1 decoding sequences (batch.py's largest step).

    Only the chunk's activations and one layer's transients live at once: the [T, H] residual stream and its norms,
    the q/k/v projections, the keys/values of one sequence expanded to every head (repeat_kv, MLA's expansion), the
    new cache tensor built while the old one is alive, the mask; for families on eager attention the [heads, T, S]
    scores (scores, masked, with sinks, and the softmax's float32; SDPA's memory-efficient kernel needs no such
    matrix: the chunk's mask makes it eligible, see ragged.py); the MoE layer's largest expert call (every token on
    one expert) and its router scores; and the logits of the rows sampled (one per sequence, float32), never
    [T, V]."""
    context = context or cfg.max_context
    anatomy = Anatomy.of(hf, cfg.torch_dtype)
    b, f32 = cfg.torch_dtype.itemsize, 4
    tokens, kv_len = min(chunk, context) + sequences - 1, context
    H, V, E = hf.hidden_size, hf.vocab_size, anatomy.num_experts
    heads, kv_heads, dk, dv = _attention_dims(hf)
    shared = max((getattr(hf, k, None) or 0 for k in ("n_shared_experts", "moe_num_shared_experts")), default=0)
    inter = max(anatomy.expert_intermediate * max(shared, 1), getattr(hf, "intermediate_size", 0) or 0,
                getattr(hf, "shared_expert_intermediate_size", 0) or 0)
    eager = not anatomy.family.model_class()._supports_sdpa
    residual = 6 * tokens * H * b
    attention = (2 * tokens * heads * (2 * dk + dv) * b  # q, k, v and their rotated / joined copies
                 + heads * (dk + dv) * kv_len * b  # one sequence's keys and values expanded per head
                 + kv_heads * (dk + dv) * kv_len * b  # the old cache of one layer while the new one is built
                 + tokens * kv_len * (b if eager else 1)  # the chunk's mask
                 + (heads * tokens * (kv_len + 1) * (3 * b + f32) if eager else heads * tokens * f32)
                 + 2 * tokens * heads * dv * b)  # the attention's output and its o_proj input
    moe = 2 * tokens * E * f32 + tokens * (3 * H + 3 * inter) * b + 3 * tokens * anatomy.top_k * 8
    logits = sequences * V * (b + f32)
    return residual + max(attention, moe) + logits


def plan_memory(hf, cfg: EngineConfig, free_bytes: int, context: int | None = None,
                host_free_bytes: int | None = None, sequences: int = 1) -> MemoryPlan:
    """The largest experts-per-layer count that fits `free_bytes` of device memory (or the configured count,
    checked), and, given `host_free_bytes`, whose offloaded experts fit the host's RAM. `offload.write_back: auto`
    keeps every expert in host RAM (no write-backs) when `host_free_bytes` holds them all beside the process, and
    swaps otherwise (also when `host_free_bytes` is None: unknown). Raises NotEnoughMemory with the numbers when
    even the requested/minimal configuration does not fit."""
    context = context or cfg.max_context
    anatomy = Anatomy.of(hf, cfg.torch_dtype)
    E, L = anatomy.num_experts, len(anatomy.moe_layers)
    expert = anatomy.expert_layout(cfg).nbytes
    dequantized = 3 * anatomy.hidden_size * anatomy.expert_intermediate * cfg.torch_dtype.itemsize  # one, unpacked
    margin = BASE_MARGIN + dequantized
    trunk = anatomy.trunk_bytes(cfg)
    kv, working = sequences * kv_cache_bytes(hf, cfg, context), prefill_bytes(hf, cfg, context, sequences)
    fixed = trunk + kv + working + margin
    wanted = cfg.offload.cpu_layers
    n = L if wanted == "all" else min(wanted, L)  # static CPU layers (more under auto if nothing else fits)

    every_expert = CacheAllocation.build(L, E, expert, 1, cfg.offload.prefetch, cuda=True, write_back=False)
    mode = cfg.offload.write_back
    if mode == "auto":
        fits = host_free_bytes is not None and every_expert.locked_host_bytes + HOST_MARGIN <= host_free_bytes
        mode = "never" if fits else "always"
    write_back = mode == "always"

    def allocation(k: int) -> CacheAllocation:  # the cache holds the layers not on the CPU (none: nothing at all)
        return CacheAllocation.build(L - n, E, expert, k if n < L else E, cfg.offload.prefetch, True, write_back)

    def spares(k: int) -> int:
        return allocation(k).spare_slots * expert

    def total(k: int) -> int:
        return fixed + (L - n) * k * expert + spares(k)

    requested = cfg.offload.experts_on_device
    if requested == "auto":
        k = max((k for k in range(1, E + 1) if total(k) <= free_bytes), default=0)
        while k == 0 and n < L:  # not even 1 expert per layer fits: the first layers' experts go to the CPU
            n += 1
            k = E if n == L and fixed <= free_bytes else max((k for k in range(1, E + 1) if total(k) <= free_bytes),
                                                               default=0)
        if k == 0:
            raise NotEnoughMemory(
                f"even with every layer's experts on the CPU (offload.cpu_layers: all), the trunk, KV cache and "
                f"working memory need {fixed / GiB:.2f} GiB, {free_bytes / GiB:.2f} GiB free. Use fewer bits, a "
                f"shorter max_context, or a larger GPU")
    else:
        k = min(requested, E)
        if total(k) > free_bytes:
            fits = max((j for j in range(1, E + 1) if total(j) <= free_bytes), default=0)
            raise NotEnoughMemory(
                f"experts_on_device={requested} needs {total(k) / GiB:.2f} GiB of device memory but "
                f"{free_bytes / GiB:.2f} GiB is free; " + (f"at most {fits} fit(s): set offload.experts_on_device "
                f"to {fits} or 'auto'" if fits else "not even 1 fits: use fewer bits or a larger GPU"))
    pinned = allocation(k).locked_host_bytes
    plan = MemoryPlan(k, expert, trunk, kv, spares(k), margin, total(k), context, working, sequences, pinned,
                      write_back=write_back and k < E, cpu_layers=n, host_static_bytes=n * E * expert)
    if host_free_bytes is not None and plan.host_total_bytes > host_free_bytes:
        held = f"{E - k} offloaded experts per layer" if write_back else f"all {E} experts per layer (write_back: never)"
        static = (f" + {plan.host_static_bytes / GiB:.2f} GiB for every expert of the first {n} layers (on the "
                  f"CPU)" if plan.host_static_bytes else "")
        raise NotEnoughMemory(
            f"host RAM: {held} need {pinned / GiB:.2f} GiB page-locked{static} + "
            f"{HOST_MARGIN / GiB:.2f} GiB for the process = {plan.host_total_bytes / GiB:.2f} GiB, but "
            f"{host_free_bytes / GiB:.2f} GiB is available and at most {k} experts per layer fit on the GPU; "
            + ("set offload.write_back to auto or always (write evicted experts back instead), or " if not write_back
               else "") + "use a machine with more RAM, a GPU with more memory, or fewer bits for the experts")
    return plan


def sequences_that_fit(hf, cfg: EngineConfig, free_bytes: int, reserve: int = 0) -> int:
    """How many sequences at `max_context` (each its KV cache, and the forward's working memory for all of them)
    fit in `free_bytes` once the model is loaded, beside `reserve` bytes kept free."""
    def need(n: int) -> int:
        return n * kv_cache_bytes(hf, cfg, cfg.max_context) + prefill_bytes(hf, cfg, sequences=n) + reserve

    low, high = 0, 4096  # need(n) grows with n: the largest n with need(n) <= free_bytes, by bisection
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if need(mid) <= free_bytes else (low, mid - 1)
    return low


def resolve_max_batch(hf, cfg: EngineConfig, device: torch.device, requested: int | None) -> tuple[int, str]:
    """The number of sequences to generate at once (offload-serve --max-batch), checked against the memory left
    after loading: device memory on CUDA (beside the working margin), host RAM on CPU. `requested` None: up to
    the config's `max_batch` when it is above 1 (the load planned memory for it), else up to MAX_BATCH, as many
    as fit. Returns it and a line saying why; NotEnoughMemory when `requested` does not fit."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        anatomy = Anatomy.of(hf, cfg.torch_dtype)
        reserve = BASE_MARGIN + 3 * anatomy.hidden_size * anatomy.expert_intermediate * cfg.torch_dtype.itemsize
        where = "GPU memory"
    else:
        free, reserve, where = available_host_bytes(), 0, "host RAM"
    fits = sequences_that_fit(hf, cfg, free, reserve)
    if requested is None and cfg.max_batch > 1:
        requested = cfg.max_batch
    per_sequence = kv_cache_bytes(hf, cfg, cfg.max_context) / GiB
    if requested is not None and requested > fits:
        raise NotEnoughMemory(
            f"--max-batch {requested}: {requested} sequences at max_context {cfg.max_context} need "
            f"{per_sequence:.2f} GiB of KV cache each, but only {fits} fit in the {free / GiB:.2f} GiB of {where} "
            f"left after loading; use --max-batch {max(fits, 1)}, a shorter max_context, or fewer experts on device")
    n = requested if requested is not None else max(1, min(MAX_BATCH, fits))
    return n, (f"{n} sequences at once ({per_sequence:.2f} GiB of KV cache each at {cfg.max_context} tokens; "
               f"{fits} would fit in the {where} left)")


def available_host_bytes() -> int:
    """RAM the kernel can give this process without swapping (MemAvailable), or free pages where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_offload(cfg: EngineConfig, hf, device: torch.device) -> tuple[int, str, int]:
    """(experts per layer on the device, "always" or "never" for write-backs, MoE layers whose experts stay on the
    CPU (offload.cpu_layers)). On CUDA: planned against the free device memory (beside `max_batch` KV caches) and
    the available host RAM. On CPU the 'device' is host RAM and nothing is page-locked, so
    'auto' keeps every expert on the device and write_back 'auto' swaps (a second copy of every expert would
    only take RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        plan = plan_memory(hf, cfg, free, host_free_bytes=available_host_bytes(), sequences=cfg.max_batch)
        return plan.experts_on_device, plan.write_back_mode, plan.cpu_layers
    anatomy = Anatomy.of(hf, cfg.torch_dtype)
    requested, E, L = cfg.offload.experts_on_device, anatomy.num_experts, len(anatomy.moe_layers)
    mode, cpu_layers = cfg.offload.write_back, cfg.offload.cpu_layers
    return ((E if requested == "auto" else min(requested, E)), ("always" if mode == "auto" else mode),
            L if cpu_layers == "all" else min(cpu_layers, L))


def resolve_experts_on_device(cfg: EngineConfig, hf, device: torch.device) -> int:
    return resolve_offload(cfg, hf, device)[0]
