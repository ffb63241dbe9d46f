"""Offloaded Mixtral: transformers' trunk (embeddings, attention, rotary, norms, lm_head) around our MoE layers.

A token's path, as `OffloadedMixtral.forward` spells it out:
  embedding -> per layer: attention (HF module, optionally 4-bit) -> router -> expert cache -> experts
  -> final norm -> lm_head -> logits (the sampler lives in generate.py).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from transformers import DynamicCache, MixtralConfig, MixtralForCausalLM
from transformers.masking_utils import create_causal_mask

from .expert_cache import ExpertCache
from .experts import ExpertLayout, expert_forward
from .kernels import REFERENCE, Kernels
from .prefetch import guess_experts, route
from .quantize import MatrixLayout, QuantLinear

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_shapes(config: MixtralConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of each attention projection."""
    H = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or H // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {"q_proj": (q_out, H), "k_proj": (kv_out, H), "v_proj": (kv_out, H), "o_proj": (H, q_out)}


class MoELayer(nn.Module):
    """Mixtral's sparse MoE block with its experts behind the expert cache; called explicitly by the model."""

    def __init__(self, layer_idx: int, config: MixtralConfig, cache: ExpertCache, layout: ExpertLayout,
                 kernels: Kernels):
        super().__init__()
        self.layer_idx, self.top_k = layer_idx, config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)  # the router
        self.cache, self.layout, self.kernels = cache, layout, kernels

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, order: list[int]) -> torch.Tensor:
        """x: [T, H] normed hidden states; weights, experts: [T, K]; order: the distinct experts, in lookup order."""
        out = torch.zeros_like(x)
        layer = self.layer_idx
        self.cache.begin_layer(layer, order)
        for i, expert in enumerate(order):
            # Prefill groups tokens by expert: each expert is fetched once and runs on all its tokens.
            token_idx, slot_idx = torch.where(experts == expert)  # [n], [n]
            buffer = self.cache.get(layer, expert, protect=order[i + 1 :])
            y = expert_forward(self.layout, buffer, x[token_idx], self.kernels)  # [n, H]
            self.cache.computed(layer, expert)
            out.index_add_(0, token_idx, y * weights[token_idx, slot_idx, None].to(y.dtype))
        self.cache.end_layer(layer)
        return out


class OffloadedMixtral(nn.Module):
    def __init__(self, config: MixtralConfig, cache: ExpertCache, layout: ExpertLayout, dtype: torch.dtype,
                 device: torch.device, kernels: Kernels = REFERENCE):
        super().__init__()
        config._attn_implementation = "sdpa"
        self.config, self.cache, self.dtype, self.device = config, cache, dtype, torch.device(device)
        self.kernels = kernels  # quantized matmuls of experts and attention (offload_engine.kernels)
        with init_empty_weights():  # the trunk's tensors stay on the meta device until loaded one by one
            hf = MixtralForCausalLM(config)
            for i, layer in enumerate(hf.model.layers):
                layer.mlp = MoELayer(i, config, cache, layout, kernels)
        self.model, self.lm_head = hf.model, hf.lm_head
        self.layers = self.model.layers
        self.prefetch = cache.prefetch_count
        self.host_syncs = 0  # device->host reads of routing decisions (one per layer, plus one with prefetch)

    # ---- loading ----
    def set_tensor(self, name: str, value: torch.Tensor) -> None:
        """Materialise one trunk parameter (e.g. 'model.norm.weight') on the device in the model dtype."""
        # dtype= is needed: without it accelerate casts to the meta parameter's dtype (float32), not ours.
        set_module_tensor_to_device(self, name, self.device, value=value, dtype=self.dtype)

    def set_attention(self, layer: int, proj: str, layout: MatrixLayout, buffer: torch.Tensor) -> None:
        attention = self.layers[layer].self_attn
        if layout.spec.bits is None:
            weight = layout.views(buffer)["weight"]
            self.set_tensor(f"model.layers.{layer}.self_attn.{proj}.weight", weight)
        else:
            setattr(attention, proj, QuantLinear(layout, buffer.to(self.device), self.kernels))

    def finish_loading(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        meta = [n for n, p in self.named_parameters() if p.device.type == "meta"]
        if meta:
            raise RuntimeError(f"parameters left unloaded: {meta[:5]}")
        self.model.rotary_emb.to(self.device)
        self.eval()

    # ---- forward ----
    def _speculate(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Layer `layer`'s router on an earlier hidden state: [T, H] -> guessed experts [prefetch], on device."""
        if not self.prefetch or layer >= len(self.layers):
            return None
        target = self.layers[layer]
        return guess_experts(target.mlp.gate(target.post_attention_layernorm(hidden)), self.prefetch)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, kv_cache: DynamicCache | None = None,
                on_routing: Callable[[int, list[list[int]], list[int]], None] | None = None) -> torch.Tensor:
        """input_ids [B, S] -> logits [B, S, V] (float32). `kv_cache` is extended in place when given.
        `on_routing(layer, experts per token, guess)` observes each layer's decisions (profiling, tests):
        the experts each token was routed to, and the experts speculatively guessed for this layer before it
        ran (empty with prefetch off)."""
        batch, seq = input_ids.shape
        past = kv_cache.get_seq_length() if kv_cache is not None else 0
        position_ids = torch.arange(past, past + seq, device=self.device)[None]  # [1, S]
        hidden = self.model.embed_tokens(input_ids.to(self.device))  # [B, S, H]
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=kv_cache,
                                  position_ids=position_ids)
        position_embeddings = self.model.rotary_emb(hidden, position_ids=position_ids)
        guess = self._speculate(0, hidden.view(-1, hidden.shape[-1]))
        guessed: list[int] = []  # the guess for the layer about to run
        if guess is not None:
            guessed = guess.tolist()
            self.cache.prefetch(0, guessed)
            self.host_syncs += 1
        for l, layer in enumerate(self.layers):
            attn_out, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=mask,
                                          position_embeddings=position_embeddings, cache=kv_cache)
            hidden = hidden + attn_out  # [B, S, H]
            flat = hidden.view(-1, hidden.shape[-1])  # [T, H]
            x = layer.post_attention_layernorm(flat)
            weights, experts = route(layer.mlp.gate(x), layer.mlp.top_k)  # [T, K], [T, K]
            guess = self._speculate(l + 1, flat)
            # One device->host read per layer: the routing decides which experts to fetch, and the guess for
            # the next layer rides along in the same transfer.
            both = experts.reshape(-1) if guess is None else torch.cat([experts.reshape(-1), guess])
            both = both.tolist()
            self.host_syncs += 1
            routed, next_guess = both[: experts.numel()], both[experts.numel() :]
            if guess is not None:
                self.cache.prefetch(l + 1, next_guess)
            order = list(dict.fromkeys(routed))  # distinct experts in order of first use
            if on_routing is not None:
                k = layer.mlp.top_k
                on_routing(l, [routed[i : i + k] for i in range(0, len(routed), k)], guessed)
            guessed = next_guess
            hidden = hidden + layer.mlp(x, weights, experts, order).view_as(hidden)
        hidden = self.model.norm(hidden)
        return self.lm_head(hidden).float()
