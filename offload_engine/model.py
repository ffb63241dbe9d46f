"""Offloaded MoE model: a family's own transformers modules around routed experts that live in the expert cache.

A token's path, as `OffloadedModel.step` spells it out:
  embedding -> per layer: attention (the family's module, optionally quantized) -> the family's MLP block:
  router -> `OffloadedExperts` -> expert cache -> experts (+ the family's shared experts; or a dense MLP)
  -> final norm -> lm_head -> logits (the sampler lives in generate.py).
A step carries the new tokens of several sequences at once, each with its own KV cache, as one flat row without
padding: every layer but the attention proper is row-wise and runs once for all of them; the attention runs per
sequence (ragged.py). Only the rows whose logits are sampled go through the final norm and the lm_head.

Only the routed experts are replaced: the family's MoE block calls `experts(hidden, top_k_index, top_k_weights)`
as it calls its own experts module, and `OffloadedExperts` hands that call back to this model's loop, which
owns what must be ordered across layers: the one device->host read of a layer's routing (with the next MoE
layer's guess riding along), the demand copies queued before the next layer's speculative copies, and the
statistics. Which layers are MoE, and where the router sits, come from the adapter table (families.py).
"""

from __future__ import annotations

import copy
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from accelerate.utils import set_module_tensor_to_device
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .anatomy import Anatomy, skeleton
from .expert_cache import ExpertCache
from .experts import ExpertLayout, expert_forward
from .hybrid import CpuTier, OrderedSum, StaticExperts
from .kernels import REFERENCE, Kernels, QuantLinear
from .prefetch import guess_experts
from .quantize import MatrixLayout
from .ragged import RAGGED, RaggedCache, RaggedMask, Segment, concat_position_embeddings
from .schedule import run_layer

RoutingObserver = Callable[[int, list[list[int]], list[int]], None]


class OffloadedExperts(nn.Module):
    """Stands where the family's routed-experts module stood, and is called like it:
    (hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]. It owns nothing but its MoE-layer number
    and a weak reference to the model's method that runs the layer (a strong one would make the model a reference
    cycle, and dropping an engine would then wait for the garbage collector to release the cache's memory)."""

    def __init__(self, moe_layer: int, run: Callable[..., torch.Tensor]):
        super().__init__()
        self.moe_layer, self.run = moe_layer, weakref.WeakMethod(run)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return self.run()(self.moe_layer, hidden, top_k_index, top_k_weights)


_ONEDNN_HEAD_DTYPES = {torch.float32, torch.bfloat16}  # those this CPU's oneDNN runs as one inner product


def head_rows(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """rows [R, H] x lm_head weight [V, H] -> [R, V]: the logits of the rows a step samples.
    On CPU, oneDNN's inner product reads W at memory speed up to ~8 rows (2 threads, 32000 x 1024 float32: 7.0 ms
    for 1 row padded to 2, 8.7 ms for 8, where MKL's F.linear took 17-25 ms at 2-8 rows and [V, H] x [H, R] 8.5 /
    15.6 ms), and on the CPU measured gives each row the same bits whatever R >= 2 (checked up to 64), so the
    lm_head adds no dependence on how many sequences share a step (mm's rows change with R). One row is padded to
    two because oneDNN's one-row kernel sums in another order."""
    if rows.device.type == "cpu" and weight.dtype in _ONEDNN_HEAD_DTYPES and torch.backends.mkldnn.is_available():
        padded = rows if rows.shape[0] > 1 else rows.expand(2, -1)  # [max(R, 2), H]
        try:
            return torch.ops.mkldnn._linear_pointwise(padded, weight, None, "none", [], "")[: rows.shape[0]]
        except RuntimeError:  # this CPU's oneDNN has no such primitive: BLAS from now on
            _ONEDNN_HEAD_DTYPES.discard(weight.dtype)
    # [V, H] x [H, R]: BLAS reads W at full speed this way round for a few rows (x @ W.T is 2-3x slower at 2-8).
    return torch.mm(weight, rows.t()).t()


@dataclass
class _Pass:
    """What one forward carries from layer to layer."""
    residual: torch.Tensor  # [T, H]: the latest residual stream, from which the next MoE layer is guessed
    on_routing: RoutingObserver | None
    guessed: list[int] = field(default_factory=list)  # the guess for the MoE layer about to run
    layer_end: float | None = None  # perf_counter when the host finished the previous MoE layer's call


class OffloadedModel(nn.Module):
    def __init__(self, config, anatomy: Anatomy, cache: ExpertCache, layout: ExpertLayout, dtype: torch.dtype,
                 device: torch.device, kernels: Kernels = REFERENCE):
        super().__init__()
        family = anatomy.family
        config._attn_implementation = "sdpa" if family.model_class()._supports_sdpa else "eager"
        self.config, self.anatomy, self.family = config, anatomy, family
        self.cache, self.layout, self.dtype, self.device = cache, layout, dtype, torch.device(device)
        self.kernels = kernels  # quantized matmuls of experts and trunk (offload_engine.kernels)
        hf, moe_layers, _ = skeleton(config, family)  # the trunk's tensors stay on the meta device until loaded
        self.model, self.lm_head = hf.model, hf.lm_head
        self.layers = self.model.layers
        self.routers = []  # per MoE layer: the family's router module, (logits, weights, indices)
        for m, l in enumerate(moe_layers):
            self.layers[l].mlp.experts = OffloadedExperts(m, self._experts)
            self.routers.append(getattr(self.layers[l].mlp, family.router))
        self.moe_layers = moe_layers
        # The attention modules call ragged.py's attention function, which runs the family's own per sequence;
        # the masks are still built for the family's implementation (self.config).
        attention_config = copy.copy(config)
        attention_config._attn_implementation = RAGGED
        for layer in self.layers:
            layer.self_attn.config = attention_config
        self.transforms_kv = bool(getattr(config, "kv_lora_rank", None))  # MLA expands its cached latents
        self.prefetch = cache.prefetch_count
        self.host_syncs = 0  # device->host reads of routing decisions (one per MoE layer, plus one with prefetch)
        # plus, in hybrid execution, the return of a layer's CPU results (one per layer call with CPU experts)
        self.cpu_tier = CpuTier("off", self.device)  # set by the loader (offload.cpu_compute)
        self.cpu_kernels: Kernels = kernels  # the CPU tier's kernels (the loader's choice for the CPU)
        # Static placement (offload.cpu_layers): MoE layers 0..cpu_layers-1 live in `static`, the rest in the cache
        # as its layers 0, 1, ...
        self.static: StaticExperts | None = None
        self.cpu_layers = 0
        self._pass: _Pass | None = None

    # ---- loading ----
    def set_tensor(self, name: str, value: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Materialise one trunk parameter (e.g. 'model.norm.weight') on the device in the model dtype (or `dtype`)."""
        # dtype= is needed: without it accelerate casts to the meta parameter's dtype (float32), not ours.
        if value.data_ptr() % 64:  # BLAS rounds differently on a misaligned operand (safetensors' buffers): the
            value = value.clone()  # same weights must give the same logits however they were loaded
        set_module_tensor_to_device(self, name, self.device, value=value, dtype=dtype or self.dtype)

    def set_linear(self, name: str, layout: MatrixLayout, buffer: torch.Tensor) -> None:
        """A trunk linear layer (e.g. 'model.layers.0.self_attn.q_proj') from its packed bytes; a bias it has was
        set before with set_tensor and stays."""
        if layout.spec.bits is None:
            self.set_tensor(f"{name}.weight", layout.views(buffer)["weight"])
            return
        parent, _, attr = name.rpartition(".")
        old = self.get_submodule(name)
        setattr(self.get_submodule(parent), attr, QuantLinear(layout, buffer.to(self.device), self.kernels, old.bias))

    def finish_loading(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        meta = [n for n, p in self.named_parameters() if p.device.type == "meta"]
        if meta:
            raise RuntimeError(f"parameters left unloaded: {meta[:5]}")
        for module in self.modules():  # buffers never loaded (rotary tables, built on the CPU) join the device
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.device.type != self.device.type:
                    setattr(module, name, buffer.to(self.device))
        self.eval()

    def fill_expert(self, moe_layer: int, expert: int, write: Callable[[torch.Tensor], None]) -> None:
        """Loading: `write(buffer)` with the expert's home (the cache's, or the static store's)."""
        store, layer = self._where(moe_layer)
        store.fill(layer, expert, write)

    def _where(self, moe_layer: int):
        """(the static store, or the cache) and the MoE layer's number in it."""
        if moe_layer < self.cpu_layers:
            return self.static, moe_layer
        return self.cache, moe_layer - self.cpu_layers

    # ---- forward ----
    def _speculate(self, moe_layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """MoE layer `moe_layer`'s router on an earlier hidden state: [T, H] -> guessed experts [prefetch] (device).
        None where there is nothing to prefetch: prefetch off, past the last layer, a static CPU layer."""
        if not self.prefetch or not self.cpu_layers <= moe_layer < len(self.moe_layers):
            return None
        norm = self.layers[self.moe_layers[moe_layer]].post_attention_layernorm
        logits = self.routers[moe_layer](norm(hidden))[0]  # [T, E]
        return guess_experts(logits, self.prefetch)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, kv_cache: DynamicCache | None = None,
                on_routing: RoutingObserver | None = None) -> torch.Tensor:
        """input_ids [B, S] -> logits [B, S, V] (float32). `kv_cache` (B = 1) is extended in place when given.
        `on_routing(moe_layer, experts per token, guess)` observes each MoE layer's decisions (profiling, tests):
        the experts each token was routed to, and the experts speculatively guessed for this layer before it
        ran (empty with prefetch off). MoE layers are numbered 0, 1, ... as the expert cache numbers them."""
        rows = torch.as_tensor(input_ids).cpu().numpy().tolist()  # host ids (numpy: not a device read to count)
        if kv_cache is not None and len(rows) != 1:
            raise ValueError(f"a kv_cache holds one sequence; got {len(rows)} rows: use step() with a cache each")
        caches = [kv_cache] if kv_cache is not None else [DynamicCache(config=self.config) for _ in rows]
        return torch.stack(self.step([Segment(row, cache, "all") for row, cache in zip(rows, caches)], on_routing))

    @torch.inference_mode()
    def step(self, segments: list[Segment], on_routing: RoutingObserver | None = None) -> list[torch.Tensor | None]:
        """One forward for the new tokens of several sequences, each extending its own KV cache (ragged.py): the
        trunk, routers, experts and lm_head run once for all tokens, attention per sequence. Returns per segment
        its float32 logits as it asked: [V] ("last"), [n, V] ("all") or None ("none").

        Whatever this raises (KeyboardInterrupt included), the expert cache is back in its idle state before the
        exception leaves (`ExpertCache.recover`); the segments' caches may then hold part of this call and should
        be dropped."""
        if not segments or any(not s.ids for s in segments):
            raise ValueError("every segment needs at least one token")
        cache = self.cache
        if cache.busy:  # an earlier forward was interrupted and never recovered: finish that first
            cache.recover()
        try:
            cache.busy = True
            logits = self._forward(segments, on_routing)
            cache.busy = False
            return logits
        except BaseException:
            while True:  # a second Ctrl-C must not leave the cache half-restored; the first one is re-raised
                try:
                    cache.recover()
                    break
                except KeyboardInterrupt:
                    continue
            raise
        finally:
            self._pass = None

    def _masks(self, hidden: torch.Tensor, kv_cache: DynamicCache, position_ids: torch.Tensor) -> list:
        """One sequence's attention mask per layer, built the way the family's own model builds it. A chunk of
        several tokens always gets its mask materialised (see ragged.py: it keeps SDPA off `enable_gqa`)."""
        kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=kv_cache,
                      position_ids=position_ids, allow_is_causal_skip=hidden.shape[1] == 1)
        builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        if self.family.masks == "layer_types":
            kinds = list(self.config.layer_types)
        elif self.family.masks == "window" and getattr(self.config, "sliding_window", None) is not None:
            kinds = ["sliding_attention"] * len(self.layers)
        else:
            kinds = ["full_attention"] * len(self.layers)
        masks = {kind: builders[kind](**kwargs) for kind in set(kinds)}
        return [masks[kind] for kind in kinds]

    def _forward(self, segments: list[Segment], on_routing) -> list[torch.Tensor | None]:
        lengths = [len(s.ids) for s in segments]
        ids = torch.tensor([[t for s in segments for t in s.ids]])  # [1, T]: every sequence's tokens, no padding
        # non_blocking: a pageable host->device copy is staged before it returns, so it needs no stream sync.
        hidden = self.model.embed_tokens(ids.to(self.device, non_blocking=True))  # [1, T, H]
        positions, masks, rotary = [], [], []
        for segment, part in zip(segments, hidden.split(lengths, dim=1)):
            past = segment.kv_cache.get_seq_length()
            position_ids = torch.arange(past, past + part.shape[1], device=self.device)[None]  # [1, n]
            masks.append(self._masks(part, segment.kv_cache, position_ids))
            # Per sequence: a rotary scaling that depends on the longest position (longrope) sees only its own.
            rotary.append(self.model.rotary_emb(part, position_ids=position_ids))
            positions.append(position_ids)
        position_ids = torch.cat(positions, dim=1)  # [1, T]
        position_embeddings = rotary[0] if len(rotary) == 1 else concat_position_embeddings(rotary)
        kv = RaggedCache([s.kv_cache for s in segments], lengths, self.transforms_kv)
        self._pass = step = _Pass(hidden.view(-1, hidden.shape[-1]), on_routing)
        guess = self._speculate(0, step.residual)
        if guess is not None:
            step.guessed = guess.tolist()
            self.host_syncs += 1
            self.cache.prefetch(0, step.guessed)  # MoE layer 0 (with static layers, _speculate(0) guesses nothing)
        for l, layer in enumerate(self.layers):
            attention_mask = RaggedMask([m[l] for m in masks], kv, self.config._attn_implementation)
            attn_out, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=attention_mask,
                                          position_embeddings=position_embeddings, position_ids=position_ids,
                                          cache=kv)
            hidden = hidden + attn_out  # [1, T, H]
            step.residual = hidden.view(-1, hidden.shape[-1])  # [T, H]
            # The family's MLP: an MoE block (router, our experts, its shared experts) or a dense MLP.
            out = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = hidden + (out[0] if self.family.block_returns_tuple else out)
        return self._logits(hidden[0], segments, lengths)

    def _logits(self, hidden: torch.Tensor, segments: list[Segment], lengths: list[int]) -> list[torch.Tensor | None]:
        """hidden [T, H] -> each segment's logits: only the rows asked for go through the norm and the lm_head
        (a prefill needs one row, not [S, V] in float32)."""
        rows, ends = [], []
        start = 0
        for segment, n in zip(segments, lengths):
            wanted = {"all": range(start, start + n), "last": [start + n - 1], "none": []}[segment.logits]
            rows.extend(wanted)
            ends.append(len(rows))
            start += n
        if not rows:
            return [None] * len(segments)
        normed = self.model.norm(hidden[torch.tensor(rows, device=hidden.device)])  # [R, H]
        head = self.lm_head
        if type(head) is nn.Linear and head.bias is None:
            logits = head_rows(head.weight, normed).float()  # [R, V]
        else:
            logits = head(normed).float()
        out, begin = [], 0
        for segment, end in zip(segments, ends):
            out.append(None if segment.logits == "none" else logits[begin] if segment.logits == "last"
                       else logits[begin:end])
            begin = end
        return out

    def _experts(self, moe_layer: int, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The routed experts of MoE layer `moe_layer` (numbered over all MoE layers, static ones included), called
        from inside the family's block.
        x: [T, H] normed hidden states; experts, weights: [T, K] (the family's router's choice) -> [T, H]."""
        step = self._pass
        if step.layer_end is not None and self.device.type == "cuda":
            # The host's own work since the last layer (launching the trunk's kernels): a layer that waits for
            # CPU experts delays it, which placement weighs (on a CPU device this time is the trunk's compute).
            self.cpu_tier.note_host_ms(1000 * (time.perf_counter() - step.layer_end))
        guess = self._speculate(moe_layer + 1, step.residual)
        # The one device->host read of the layer: the routing decides which experts to fetch, and the guess
        # for the next MoE layer rides along in the same transfer. Everything else stays on the device.
        both = experts.reshape(-1) if guess is None else torch.cat([experts.reshape(-1), guess])
        both = both.tolist()
        self.host_syncs += 1
        routed, next_guess = both[: experts.numel()], both[experts.numel() :]
        if step.on_routing is not None:
            k = experts.shape[-1]
            step.on_routing(moe_layer, [routed[i : i + k] for i in range(0, len(routed), k)], step.guessed)
        step.guessed = next_guess
        # The next layer's speculative copies are queued after this layer's demand copies.
        next_in_cache = moe_layer + 1 - self.cpu_layers  # its number in the cache (static layers are not there)
        then = (lambda: self.cache.prefetch(next_in_cache, next_guess)) if guess is not None else None
        out = self._run_experts(moe_layer, x, weights, experts, routed, then)
        step.layer_end = time.perf_counter()
        return out

    def _run_experts(self, layer: int, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                     routed: list[int], then: Callable[[], None] | None) -> torch.Tensor:
        """x: [T, H]; weights, experts: [T, K]; routed: `experts` already read to the host (flat, T*K).
        `then()` runs once every demand copy is queued (the next layer's speculative copies)."""
        order = list(dict.fromkeys(routed))  # distinct experts in order of first use
        counts = Counter(routed)
        store, index = self._where(layer)
        if store is self.static:  # static placement: every expert of the layer on the CPU
            on_cpu = set(order)
        else:  # hybrid: the misses the CPU computes
            on_cpu = self.cpu_tier.place(self.cache, index, counts, order)
        if x.shape[0] == 1:  # decode: no gathering or scattering of tokens, 2-3 ops per expert instead of 7
            return self._run_one_token(layer, x, weights, order, then, on_cpu)
        # Each expert's (token, k) positions from one device sort, sliced at offsets counted on the host: no
        # host sync per expert. Stable, so each expert's tokens stay ascending (the reference's summation order).
        positions = torch.sort(experts.view(-1), stable=True).indices  # [T*K], grouped by expert id
        starts, offset = {}, 0
        for expert in sorted(counts):
            starts[expert], offset = offset, offset + counts[expert]
        out = torch.zeros_like(x)
        flat_weights = weights.reshape(-1)  # [T*K]
        where: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def rows(expert: int) -> tuple[torch.Tensor, torch.Tensor]:
            """The expert's (token, k) positions [n] and its tokens [n]."""
            if expert not in where:
                pos = positions[starts[expert] : starts[expert] + counts[expert]]
                where[expert] = pos, pos // experts.shape[-1]
            return where[expert]

        summed = OrderedSum(order, lambda expert, y: out.index_add_(0, rows(expert)[1], y))

        def weighted(expert: int, y: torch.Tensor) -> None:
            summed.put(expert, y * flat_weights[rows(expert)[0], None].to(y.dtype))

        def kernels(expert: int, buffer: torch.Tensor) -> None:
            weighted(expert, expert_forward(self.layout, buffer, x[rows(expert)[1]], self.kernels))  # [n, H]

        self._run_layer(layer, order, kernels, then, on_cpu, lambda expert: x[rows(expert)[1]], weighted)
        return out

    def _run_one_token(self, layer: int, x: torch.Tensor, weights: torch.Tensor, order: list[int],
                       then: Callable[[], None] | None, on_cpu: set[int]) -> torch.Tensor:
        """`_run_experts` for one token: x [1, H], weights [1, K]; `order` is the token's routing. The same sums
        in the same order as the general path's index_add_ into zeros."""
        total: list[torch.Tensor] = []
        summed = OrderedSum(order, lambda expert, y: total[0].add_(y) if total else total.append(y))

        def weighted(expert: int, y: torch.Tensor) -> None:
            summed.put(expert, y * weights[:, order.index(expert), None].to(y.dtype))

        def kernels(expert: int, buffer: torch.Tensor) -> None:
            weighted(expert, expert_forward(self.layout, buffer, x, self.kernels))  # [1, H]

        self._run_layer(layer, order, kernels, then, on_cpu, lambda expert: x, weighted)
        return total[0]

    def _run_layer(self, layer: int, order: list[int], kernels: Callable[[int, torch.Tensor], None],
                   then: Callable[[], None] | None, on_cpu: set[int],
                   rows: Callable[[int], torch.Tensor], weighted: Callable[[int, torch.Tensor], None]) -> None:
        """schedule.run_layer, with the CPU experts `on_cpu` (if any) started on the CPU tier: `rows(expert)` are
        its tokens' rows of x [n, H], `weighted(expert, y)` adds its result [n, H] as the device's kernels do."""
        store, index = self._where(layer)

        def cpu_kernels(jobs: list[tuple[int, torch.Tensor]]) -> Callable[[], None]:
            return self.cpu_tier.start(store, index, jobs, rows, self._expert_on_cpu, weighted, self._cpu_synced)

        run_layer(store, index, order, kernels, then, on_cpu, cpu_kernels)

    def _expert_on_cpu(self, host_slot: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One expert from its host slot on the CPU (the worker thread): x [n, H] (host) -> [n, H] (host)."""
        return expert_forward(self.layout, host_slot, x, self.cpu_kernels)

    def _cpu_synced(self) -> None:
        self.host_syncs += 1  # the host waited for a layer's CPU results
