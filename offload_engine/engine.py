"""The `Engine`: logits, text generation, chat sessions and cache statistics for a loaded model (`load`, in
loader.py, builds one)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from transformers import DynamicCache

from .batch import MAX_BATCH, Generation
from .cache_stats import total, with_rates
from .chat import ChatSession
from .concurrency import EngineLock, locked_iter
from .config import EngineConfig
from .expert_cache import ExpertCache
from .generate import (SamplingParams, check_int, check_token_ids, generate_batch, generate_tokens, is_batch,
                       new_sequence, per_prompt_options, stream_batch, stream_text)
from .kernels import Kernels
from .model import OffloadedModel
from .tokenization import encode_text


class EngineClosedError(RuntimeError):
    """The engine was used after `close()`."""


class ClosedLock:
    """The lock of a closed engine. Every use of an engine (logits, generation, chat turns, a server's worker) takes
    its lock first, so every use after close() fails here, saying why, instead of deep inside the freed cache."""

    locked = False

    def acquire(self) -> None:
        raise EngineClosedError("the engine is closed: close() freed its expert cache; load the model again "
                                "(offload_engine.load) to use it")

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc) -> None:
        pass


class Engine:
    """Thread-safe: calls are serialized by `lock` (see concurrency.py); a stream holds it until it is exhausted,
    closed or garbage-collected, so finish or close() streams you abandon."""

    def __init__(self, model: OffloadedModel, config: EngineConfig, tokenizer=None, model_dir: Path | None = None,
                 kernel_warmup_s: float = 0.0):
        self.model, self.config, self.tokenizer, self.model_dir = model, config, tokenizer, model_dir
        self.cache: ExpertCache = model.cache
        self.device = model.device
        self.kernels: Kernels = model.kernels
        self.kernel_warmup_s = kernel_warmup_s  # compiling the fused kernels at load
        self.lock = EngineLock()  # one forward at a time: the expert cache is shared mutable state

    # ---- forward ----
    def logits(self, input_ids: torch.Tensor | list) -> torch.Tensor:
        """Full forward without KV reuse: [batch, seq] token ids -> [batch, seq, vocab] float32 logits."""
        vocab = self.model.config.vocab_size
        if hasattr(input_ids, "dtype"):  # a tensor or array
            shape = tuple(input_ids.shape)
            ids = torch.tensor(check_token_ids(input_ids, vocab), dtype=torch.long).view(shape)
        else:
            nested = isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple))
            rows = input_ids if nested else [input_ids]
            rows = [check_token_ids(row, vocab) for row in rows]
            if len({len(row) for row in rows}) > 1:
                raise ValueError(f"input_ids rows differ in length ({sorted({len(r) for r in rows})}); pad them or "
                                 f"run them one at a time")
            ids = torch.tensor(rows, dtype=torch.long)
        if ids.dim() not in (1, 2):
            raise ValueError(f"input_ids must be [seq] or [batch, seq] token ids, got shape {tuple(ids.shape)}")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.numel() == 0:
            raise ValueError("input_ids is empty: pass at least one token")
        with self.lock:
            return self.model(ids).cpu()

    def encode(self, prompt: str | list[int]) -> list[int]:
        """A string through the tokenizer (with BOS; Mixtral's as sentencepiece encodes it, see tokenization.py),
        or token ids as given."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer files; pass token ids instead of text")
            ids = encode_text(self.tokenizer, prompt, bos=True)
        else:
            ids = check_token_ids(prompt, self.model.config.vocab_size)
            if len(getattr(prompt, "shape", (0,))) > 1:
                raise ValueError(f"a prompt is one sequence of token ids, got shape {list(prompt.shape)}")
        if not ids or (isinstance(prompt, str) and not prompt.strip()):
            raise ValueError("the prompt is empty: give some text or token ids")
        return check_token_ids(ids, self.model.config.vocab_size)

    # ---- generation ----
    @property
    def context_window(self) -> int:
        return min(self.config.max_context, self.model.config.max_position_embeddings)

    @property
    def eos_ids(self) -> list[int]:
        eos = self.model.config.eos_token_id
        ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
        return ids + ([tokenizer_eos] if tokenizer_eos is not None and tokenizer_eos not in ids else [])

    def _request(self, prompt: str | list[int], sampling: dict) -> tuple[list[int], SamplingParams]:
        params = SamplingParams.from_kwargs(**sampling)
        ids = self.encode(prompt)
        if len(ids) + params.max_new_tokens > self.context_window:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"context window of {self.context_window} tokens: shorten the prompt or max_new_tokens")
        return ids, params

    def _tokens(self, prompt: str | list[int], sampling: dict) -> tuple[Iterator[int], SamplingParams]:
        ids, params = self._request(prompt, sampling)
        kv_cache = DynamicCache(config=self.model.config)  # grows with the request, freed with it
        return generate_tokens(self.model, ids, params, kv_cache, self.eos_ids), params

    def _batch(self, prompts: list, sampling: dict, max_batch: int) -> tuple[list[Generation], list[SamplingParams]]:
        """One sequence per prompt, each with its own KV cache and sampler; a sampling option given as a list
        holds one value per prompt (`stop`: a list of lists), others apply to every prompt."""
        check_int("max_batch", max_batch, 1)
        requests = []
        for i, options in enumerate(per_prompt_options(sampling, len(prompts))):
            try:
                requests.append(self._request(prompts[i], options))
            except ValueError as e:
                raise type(e)(f"prompts[{i}]: {e}") from None
        eos = self.eos_ids
        sequences = [new_sequence(ids, params, DynamicCache(config=self.model.config), eos) for ids, params in requests]
        return sequences, [params for _, params in requests]

    def generate_ids(self, prompt: str | list[int] | list, *, max_batch: int = MAX_BATCH,
                     **sampling) -> list[int] | list[list[int]]:
        """Generated token ids (EOS excluded). Sampling options: see SamplingParams (greedy by default).
        A list of prompts (strings or token-id lists) gives a list of results in the same order, generated as
        one batch of up to `max_batch` sequences at a time (see `generate`)."""
        if is_batch(prompt):
            sequences, _ = self._batch(prompt, sampling, max_batch)
            for _ in locked_iter(self.lock, generate_batch(self.model, sequences, max_batch)):
                pass
            return [seq.tokens for seq in sequences]
        tokens, _ = self._tokens(prompt, sampling)
        return list(locked_iter(self.lock, tokens))

    def stream(self, prompt: str | list[int] | list, *, max_batch: int = MAX_BATCH,
               **sampling) -> Iterator[str] | Iterator[tuple[int, str]]:
        """Text pieces as they are generated; joined, they equal `generate(...)`. For a list of prompts: (index,
        piece) pairs, the pieces of each prompt in order, the prompts interleaved as the batch steps."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; use generate_ids() with token ids")
        if is_batch(prompt):
            sequences, params = self._batch(prompt, sampling, max_batch)
            pieces = stream_batch(self.model, sequences, self.tokenizer, [p.stop for p in params], max_batch)
            return locked_iter(self.lock, pieces)
        tokens, params = self._tokens(prompt, sampling)
        return locked_iter(self.lock, stream_text(tokens, self.tokenizer, params.stop))

    def generate(self, prompt: str | list[int] | list, *, max_batch: int = MAX_BATCH, **sampling) -> str | list[str]:
        """The generated text (prompt excluded, stop string removed).

        A list of prompts returns a list of texts in the same order: each prompt has its own KV cache and may
        have its own options (a list with one value per prompt, e.g. `seed=[1, 2]`, `max_new_tokens=[16, 64]`,
        `stop=[["."], ["\\n"]]`), and each generates exactly what it generates alone. Up to `max_batch` run at
        once, sharing every forward step (each expert is read once per step for all of them); the others join
        as those finish."""
        if is_batch(prompt):
            texts = [""] * len(prompt)
            for i, piece in self.stream(prompt, max_batch=max_batch, **sampling):
                texts[i] += piece
            return texts
        return "".join(self.stream(prompt, **sampling))

    def chat(self, system: str | None = None) -> ChatSession:
        return ChatSession(self, system)

    # ---- statistics ----
    def stats(self) -> dict:
        """Cache counters overall and per layer (see LayerStats), plus their rates (defined in cache_stats.py)
        and the host syncs. Hybrid execution: `cpu_compute` (the mode, and for auto its calibration or why it is
        moot), `cpu_calibration` (the measured costs, ms), per layer and overall `cpu_computed` and `cpu_ms`.
        Static placement: `cpu_layers` (the first MoE layers, whose experts are all computed on the CPU; their
        `per_layer` entries count every expert used as a lookup, a miss and `cpu_computed`)."""
        tier, static = self.model.cpu_tier, self.model.static
        layer_stats = self.layer_stats()
        return {
            "overall": with_rates(total(layer_stats)),
            "per_layer": [with_rates(s) for s in layer_stats],
            # routing reads + returns of CPU results (hybrid) + cache waits (profiling)
            "host_syncs": self.model.host_syncs + self.cache.host_waits,
            "experts_on_device": self.cache.k if self.cache.num_layers else 0,
            "prefetch": self.cache.prefetch_count,
            "prefetch_min_precision": self.cache.gate.min_precision,
            "write_back": "always" if self.cache.write_back else "never",
            "cpu_compute": tier.describe(),
            "cpu_compute_mode": tier.mode,
            "cpu_compute_active": tier.active,
            "cpu_calibration": tier.calibration(),
            "cpu_threads": tier.worker.threads if tier.worker is not None else None,
            "cpu_layers": self.model.cpu_layers,
            "device_bytes": self.cache.device_bytes(),
            "host_bytes": self.cache.host_bytes() + (static.host_bytes() if static else 0),
            "kernels": self.kernels.name,
            "kernel_warmup_s": self.kernel_warmup_s,
            "host_locked_bytes": self.cache.locked_bytes,  # page-locked (CUDA): exactly host_bytes, 0 on CPU
        }

    def layer_stats(self) -> list:
        """The counters of every MoE layer (LayerStats), the static CPU layers' first; read without the lock."""
        static = self.model.static
        return (static.stats if static else []) + self.cache.stats

    def reset_stats(self) -> None:
        with self.lock:
            self.cache.reset_stats()
            if self.model.static:
                self.model.static.reset_stats()
            self.model.host_syncs = 0

    @property
    def closed(self) -> bool:
        return isinstance(self.lock, ClosedLock)

    def close(self) -> None:
        """Wait for the cache's copies, then free its device slots and unlock its host memory (also done when the
        engine is garbage-collected). Using the engine afterwards raises EngineClosedError; closing again does
        nothing."""
        if not self.closed:
            self.lock = ClosedLock()
            self.model.cpu_tier.close()
            self.cache.close()

