"""Device memory arithmetic: how many experts per layer fit beside the trunk, the KV cache and a working margin.

Everything is computed from shapes and the byte layouts, before anything is allocated, so that asking for
more than fits is an error up front rather than an out-of-memory crash halfway through loading.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import MixtralConfig

from .config import EngineConfig
from .experts import ExpertLayout
from .quantize import MatrixLayout

GiB = 1024**3
# CUDA context, allocator fragmentation, activations and one expert's dequantized matrices at a time.
BASE_MARGIN = int(0.75 * GiB)


class NotEnoughMemory(MemoryError):
    pass


@dataclass(frozen=True)
class MemoryPlan:
    experts_on_device: int  # per layer
    expert_bytes: int  # one packed expert
    trunk_bytes: int  # embeddings, lm_head, norms, routers, attention
    kv_cache_bytes: int  # for `context` tokens
    spare_bytes: int  # the cache's shared spare slots
    margin_bytes: int
    total_bytes: int  # everything above with `experts_on_device` experts per layer
    context: int

    def summary(self) -> str:
        g = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
        return (f"{self.experts_on_device} experts/layer x {self.expert_bytes / 2**20:.1f} MiB; trunk {g(self.trunk_bytes)}, "
                f"KV cache ({self.context} tokens) {g(self.kv_cache_bytes)}, spare slots {g(self.spare_bytes)}, "
                f"margin {g(self.margin_bytes)}; total {g(self.total_bytes)}")


def _head_dim(hf: MixtralConfig) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def trunk_bytes(hf: MixtralConfig, cfg: EngineConfig) -> int:
    itemsize = cfg.torch_dtype.itemsize
    H, V, E = hf.hidden_size, hf.vocab_size, hf.num_local_experts
    q_out, kv_out = hf.num_attention_heads * _head_dim(hf), hf.num_key_value_heads * _head_dim(hf)
    shapes = [(q_out, H), (kv_out, H), (kv_out, H), (H, q_out)]
    attention = sum(MatrixLayout.build(s, cfg.quant.attention, cfg.torch_dtype).nbytes for s in shapes)
    per_layer = attention + (2 * H + E * H) * itemsize  # + two norms and the router
    embeddings = V * H * itemsize * (1 if hf.tie_word_embeddings else 2)
    return hf.num_hidden_layers * per_layer + embeddings + H * itemsize


def kv_cache_bytes(hf: MixtralConfig, cfg: EngineConfig, context: int) -> int:
    return 2 * hf.num_hidden_layers * hf.num_key_value_heads * _head_dim(hf) * context * cfg.torch_dtype.itemsize


def plan_memory(hf: MixtralConfig, cfg: EngineConfig, free_bytes: int, context: int | None = None) -> MemoryPlan:
    """The largest experts-per-layer count that fits `free_bytes` of device memory (or the configured count,
    checked). Raises NotEnoughMemory with the numbers when even the requested/minimal configuration does not fit."""
    context = context or cfg.max_context
    E, L = hf.num_local_experts, hf.num_hidden_layers
    expert = ExpertLayout.build(hf.hidden_size, hf.intermediate_size, cfg.quant.experts, cfg.torch_dtype).nbytes
    dequantized = 3 * hf.hidden_size * hf.intermediate_size * cfg.torch_dtype.itemsize  # one expert, unpacked
    margin = BASE_MARGIN + dequantized
    fixed = trunk_bytes(hf, cfg) + kv_cache_bytes(hf, cfg, context) + margin

    def spares(k: int) -> int:
        return 0 if k >= E else (1 + 2 * cfg.offload.prefetch) * expert

    def total(k: int) -> int:
        return fixed + L * k * expert + spares(k)

    requested = cfg.offload.experts_on_device
    if requested == "auto":
        k = max((k for k in range(1, E + 1) if total(k) <= free_bytes), default=0)
        if k == 0:
            raise NotEnoughMemory(
                f"not even 1 expert per layer fits: {total(1) / GiB:.2f} GiB needed, {free_bytes / GiB:.2f} GiB free. "
                f"Use fewer bits for the experts, a shorter max_context, or a larger GPU")
    else:
        k = min(requested, E)
        if total(k) > free_bytes:
            fits = max((j for j in range(1, E + 1) if total(j) <= free_bytes), default=0)
            raise NotEnoughMemory(
                f"experts_on_device={requested} needs {total(k) / GiB:.2f} GiB of device memory but "
                f"{free_bytes / GiB:.2f} GiB is free; " + (f"at most {fits} fit(s): set offload.experts_on_device "
                f"to {fits} or 'auto'" if fits else "not even 1 fits: use fewer bits or a larger GPU"))
    return MemoryPlan(k, expert, trunk_bytes(hf, cfg), kv_cache_bytes(hf, cfg, context), spares(k), margin,
                      total(k), context)


def resolve_experts_on_device(cfg: EngineConfig, hf: MixtralConfig, device: torch.device) -> int:
    """On CUDA: plan against the free memory. On CPU the 'device' is host RAM, so 'auto' keeps every expert."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return plan_memory(hf, cfg, free).experts_on_device
    requested = cfg.offload.experts_on_device
    return hf.num_local_experts if requested == "auto" else min(requested, hf.num_local_experts)
