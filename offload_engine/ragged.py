"""Attention over a ragged batch: the new tokens of several sequences, each with its own KV cache, in one forward.

The tokens of all sequences are concatenated into one flat row ([1, T, H], no padding), so every weight-heavy part
of a layer (the family's q/k/v/o projections, norms and rotary embedding, then the router and the experts) runs
once for all of them. Only the attention proper is per sequence: the family's attention module hands its new keys
and values to `RaggedCache.update`, which appends each sequence's share to that sequence's own cache, and then calls
the attention function registered here (`RAGGED`), which splits the queries and runs the family's own attention
(sdpa or eager) per sequence, on that sequence's keys, values and mask. A sequence so computes what it computes
alone, whatever else is in the batch.

Long prefills run in chunks (the scheduler, batch.py), and a chunk's mask is always materialised: without a mask
transformers calls SDPA with `enable_gqa=True`, which on GPUs below sm_80 (a T4) leaves only the math backend and
its [heads, S, S] score matrix; with a mask the keys are expanded per head and the memory-efficient backend is
eligible.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

RAGGED = "offload_ragged"  # the attention implementation the attention modules are switched to


@dataclass
class Segment:
    """One sequence's share of a forward: its new tokens, its KV cache (extended in place), and which positions'
    logits it wants: "last" (the next token's, [V]), "all" ([n, V]) or "none" (a prefill chunk before the last)."""
    ids: list[int]
    kv_cache: DynamicCache
    logits: str = "last"


class RaggedCache:
    """Stands in for the KV cache inside the family's attention module for one forward: `update` splits the new
    keys/values [1, kv_heads, T, d] by sequence and appends each share to that sequence's cache.

    What it returns goes through the module before reaching the attention function. Families whose module
    transforms the cached states first (MLA decompresses its latents: `transforms_kv`) get every sequence's full
    states concatenated along the tokens; the others get the new states back unchanged (unused), and the attention
    function reads each sequence's own states from `keys` / `values`, so nothing is copied."""

    def __init__(self, caches: list[DynamicCache], new_lengths: list[int], transforms_kv: bool):
        self.caches, self.new_lengths, self.transforms_kv = caches, new_lengths, transforms_kv
        self.keys: list[torch.Tensor] = []  # per sequence, the latest layer's states after update
        self.values: list[torch.Tensor] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys = key_states.split(self.new_lengths, dim=-2)
        values = value_states.split(self.new_lengths, dim=-2)
        updated = [cache.update(k, v, layer_idx, *args, **kwargs) for cache, k, v in zip(self.caches, keys, values)]
        self.keys, self.values = [k for k, _ in updated], [v for _, v in updated]
        if len(updated) == 1:
            return updated[0]
        if self.transforms_kv:
            return torch.cat(self.keys, dim=-2), torch.cat(self.values, dim=-2)
        return key_states, value_states

    @property
    def kv_lengths(self) -> list[int]:
        return [k.shape[-2] for k in self.keys]


@dataclass
class RaggedMask:
    """Passed as the attention module's `attention_mask` (which every family hands to the attention function
    untouched): each sequence's mask for this layer, and the cache whose update just ran."""
    masks: list
    cache: RaggedCache
    implementation: str  # the family's own attention: "sdpa" or "eager"
    functions: dict = field(default_factory=dict)


def _family_attention(module: torch.nn.Module, implementation: str):
    """The attention function the module would have called: sdpa, or its own modeling file's eager function
    (which may differ from Llama's, e.g. GPT-OSS's attention sinks)."""
    if implementation == "sdpa":
        return sdpa_attention_forward
    return sys.modules[type(module).__module__].eager_attention_forward


def ragged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: RaggedMask, **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, heads, T, d] of all sequences -> [1, T, heads, d], attention run per sequence."""
    plan = attention_mask
    attend = plan.functions.get(type(module))
    if attend is None:
        attend = plan.functions[type(module)] = _family_attention(module, plan.implementation)
    if len(plan.masks) == 1:
        return attend(module, query, key, value, plan.masks[0], **kwargs)[0], None
    cache = plan.cache
    if cache.transforms_kv:
        keys, values = key.split(cache.kv_lengths, dim=-2), value.split(cache.kv_lengths, dim=-2)
    else:
        keys, values = cache.keys, cache.values
    queries = query.split(cache.new_lengths, dim=-2)
    outputs = [attend(module, q, k, v, mask, **kwargs)[0] for q, k, v, mask in zip(queries, keys, values, plan.masks)]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(RAGGED, ragged_attention)


def concat_position_embeddings(parts: list):
    """Per-sequence rotary embeddings ((cos, sin) [1, n, d] each, or one tensor) joined along the tokens."""
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p, dim=1) for p in zip(*parts))
    return torch.cat(parts, dim=1)
