"""Measuring a running engine for scripts/profile_cache.py: the decode steps' routing, guesses and time split
(`Recorder`), and how well the next MoE layers can be guessed at each distance (`guess_quality`)."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch
from transformers import DynamicCache

from . import cache_stats
from . import model as model_module
from .engine import Engine
from .cache_stats import LayerStats
from .prefetch import guess_experts


def add_stats(total: list[LayerStats], engine: Engine) -> None:
    """Add the engine's per-layer counters since its last reset into ``total``."""
    for acc, layer in zip(total, engine.stats()["per_layer"]):
        acc.add(cache_stats.counters(layer))


class Recorder:
    """Stands in for ``engine.model`` inside ``generate_tokens``: each step runs the real forward with ``on_routing``,
    records the decode steps' routing and guesses, times them, and keeps decode counters apart from the prefill's."""

    def __init__(self, engine: Engine):
        self.engine, self.model, self.cache = engine, engine.model, engine.cache
        self.cuda = engine.device.type == "cuda"
        self.cache.timing = self.cuda  # CUDA: block on in-flight copies to measure the wait (counted as syncs)
        n_layers = len(self.model.moe_layers)  # the expert cache numbers MoE layers only
        self.prefill_stats = [LayerStats() for _ in range(n_layers)]
        self.routing: list[list[list[int]]] = []
        self.guesses: list[list[list[int]]] = []
        self.forward_s: list[float] = []  # per decode step
        self.blocked_s = 0.0  # decode steps: host time blocked in device->host reads (CUDA)
        self.copy_s = 0.0  # decode steps only (CPU)
        self.expert_s = 0.0  # decode steps only (CPU)
        self.prefill_s = 0.0
        self._in_decode = False
        self._prefill_left = 0  # prompt tokens not yet prefilled (a long prompt is prefilled in chunks)
        self.prefill_end = 0.0

    def start_prompt(self, prompt_tokens: int) -> None:
        self.engine.reset_stats()
        self._prefill_left = prompt_tokens

    def step(self, segments: list, on_routing=None) -> list:
        prefill = self._prefill_left > 0
        self._prefill_left -= len(segments[0].ids) if prefill else 0
        n_layers = len(self.model.moe_layers)  # the expert cache numbers MoE layers only
        rows: list[list[int]] = [[] for _ in range(n_layers)]
        guesses: list[list[int]] = [[] for _ in range(n_layers)]

        def on_routing(layer: int, experts_per_token: list[list[int]], guess: list[int]) -> None:
            rows[layer] = list(experts_per_token[-1])
            guesses[layer] = list(guess)  # the guess made for this layer before it ran

        self._in_decode = not prefill
        start = time.perf_counter()
        with self.timed_reads(not prefill and self.cuda):
            logits = self.model.step(segments, on_routing=on_routing)
        if self.cuda:
            issued = time.perf_counter()
            torch.cuda.synchronize(self.engine.device)
            if not prefill:
                self.blocked_s += time.perf_counter() - issued
        elapsed = time.perf_counter() - start
        self._in_decode = False
        if prefill:
            self.prefill_s += elapsed
            if not self._prefill_left:
                add_stats(self.prefill_stats, self.engine)
                self.engine.reset_stats()  # from here on the counters cover decode steps only
                self.prefill_end = time.perf_counter()
        else:
            self.routing.append(rows)
            self.guesses.append(guesses)
            self.forward_s.append(elapsed)
        return logits

    @contextlib.contextmanager
    def timed_reads(self, on: bool) -> Iterator[None]:
        """Time `Tensor.tolist` (the routing reads, which block the host on CUDA) while `on`."""
        if not on:
            yield
            return
        tolist = torch.Tensor.tolist

        def timed(tensor):
            start = time.perf_counter()
            try:
                return tolist(tensor)
            finally:
                self.blocked_s += time.perf_counter() - start
        torch.Tensor.tolist = timed
        try:
            yield
        finally:
            torch.Tensor.tolist = tolist

    @contextlib.contextmanager
    def instrumented(self) -> Iterator[bool]:
        """On CPU, time the cache's copies and the expert computations (both synchronous there). Yields whether
        the timers are in place. Nothing on disk changes: an instance attribute and a module global are swapped."""
        if self.cuda or not hasattr(self.cache, "_copy") or not hasattr(model_module, "expert_forward"):
            yield False
            return
        copy, expert_forward = self.cache._copy, model_module.expert_forward

        def timed(fn: Callable, field: str) -> Callable:
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                if self._in_decode:
                    setattr(self, field, getattr(self, field) + time.perf_counter() - start)
                return out
            return wrapper

        self.cache._copy = timed(copy, "copy_s")
        model_module.expert_forward = timed(expert_forward, "expert_s")
        try:
            yield True
        finally:
            del self.cache._copy  # back to the class's method
            model_module.expert_forward = expert_forward


def guess_quality(engine: Engine, prompts: list[dict], distances: list[int]) -> dict:
    """Precision and recall of guessing MoE layer l + d from the residual after layer l's attention (the earliest
    the engine has it), with 1 and top_k guesses, teacher-forced on each prompt's generated tokens."""
    model, top_k = engine.model, engine.model.anatomy.top_k
    n_layers = len(model.moe_layers)
    residuals: dict[int, torch.Tensor] = {}
    hooks = [model.layers[layer].post_attention_layernorm.register_forward_pre_hook(
        lambda module, args, m=m: residuals.__setitem__(m, args[0].reshape(-1, args[0].shape[-1])[-1:]))
        for m, layer in enumerate(model.moe_layers)]  # the residual stream entering layer m's MLP: [1, H]
    counts = sorted({1, top_k})
    tally = {(d, c): [0, 0, 0] for d in distances for c in counts}  # correct, guessed, used
    try:
        for prompt in prompts:
            kv_cache = DynamicCache(config=model.config)
            ids, start = prompt["prompt_ids"] + prompt["generated_ids"][:-1], len(prompt["prompt_ids"])
            for i, chunk in enumerate([ids[:start]] + [[token] for token in ids[start:]]):
                used: dict[int, set] = {}
                with torch.inference_mode():
                    model(torch.tensor([chunk]), kv_cache,
                          on_routing=lambda layer, per_token, guess: used.__setitem__(layer, set(per_token[-1])))
                    if i == 0:
                        continue  # the prefill: not a decode step
                    after_attention = dict(residuals)  # (the norms called below run the hooks too)
                    for layer, d in ((layer, d) for layer in range(n_layers) for d in distances):
                        if layer + d >= n_layers:
                            continue
                        norm = model.layers[model.moe_layers[layer + d]].post_attention_layernorm
                        logits = model.routers[layer + d](norm(after_attention[layer]))[0]  # [1, E]
                        for c in counts:
                            guess, t = set(guess_experts(logits, c).tolist()), tally[d, c]
                            t[0] += len(guess & used[layer + d])
                            t[1] += len(guess)
                            t[2] += len(used[layer + d])
    finally:
        for hook in hooks:
            hook.remove()
    return {d: {c: {"precision": t[0] / t[1], "recall": t[0] / t[2], "guesses": t[1]}
                for c in counts if (t := tally[d, c])[1]} for d in distances}
