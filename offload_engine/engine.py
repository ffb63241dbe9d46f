"""Public API: `load(...)` returns an `Engine` that computes logits, generates text and reports cache statistics."""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Union

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .anatomy import Anatomy
from .batch import MAX_BATCH, Generation
from .chat import ChatSession
from .concurrency import EngineLock, locked_iter
from .checkpoint import SafetensorsCheckpoint, read_config, resolve_model_dir
from .config import ConfigError, EngineConfig, load_config
from .expert_cache import ExpertCache, LayerStats
from .expert_tensors import read_expert_tensor
from .experts import ExpertLayout
from .generate import (SamplingParams, check_int, check_token_ids, generate_batch, generate_tokens, is_batch,
                       new_sequence, per_prompt_options, stream_batch, stream_text)
from .memory import resolve_experts_on_device
from .kernels import REFERENCE, Kernels, select_kernels, warm_up
from .model import OffloadedModel
from .quantize import MatrixLayout, QuantizationError, quantize_matrix

MANIFEST = "offload_manifest.json"  # marks a pre-quantized checkpoint (see prequantized.py)
ConfigLike = Union[None, str, os.PathLike, dict, EngineConfig]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        """A string through the tokenizer (with BOS), or token ids as given."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer files; pass token ids instead of text")
            ids = self.tokenizer(prompt)["input_ids"]
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
        """Cache counters overall and per layer (see LayerStats), plus derived rates and the host syncs."""
        total = LayerStats()
        for layer_stats in self.cache.stats:
            total.add(layer_stats)

        def with_rates(s: LayerStats) -> dict:
            d = asdict(s)
            d["hit_rate"] = s.hits / s.lookups if s.lookups else 0.0
            d["prefetch_precision"] = s.guessed_correct / s.guessed if s.guessed else 0.0
            d["prefetch_recall"] = s.guessed_correct / s.needed_after_guess if s.needed_after_guess else 0.0
            return d

        return {
            "overall": with_rates(total),
            "per_layer": [with_rates(s) for s in self.cache.stats],
            "host_syncs": self.model.host_syncs + self.cache.host_waits,  # routing reads + cache waits (profiling)
            "experts_on_device": self.cache.k,
            "prefetch": self.cache.prefetch_count,
            "device_bytes": self.cache.device_bytes(),
            "host_bytes": self.cache.host_bytes(),
            "kernels": self.kernels.name,
            "kernel_warmup_s": self.kernel_warmup_s,
            "host_locked_bytes": self.cache.locked_bytes,  # page-locked (CUDA): exactly host_bytes, 0 on CPU
        }

    def reset_stats(self) -> None:
        with self.lock:
            self.cache.reset_stats()
            self.model.host_syncs = 0

    def close(self) -> None:
        """Wait for the cache's copies, then free its device slots and unlock its host memory (also done when the
        engine is garbage-collected). The engine cannot run afterwards."""
        self.cache.close()


def load(model: str | os.PathLike, config: ConfigLike = None, device: str | torch.device | None = None,
         progress: bool = True) -> Engine:
    """Load an MoE checkpoint of a supported family (local directory or hub repo id), quantize it as configured,
    and build the engine.

    Pre-quantized checkpoints (written by `quantize_checkpoint`) load without re-quantizing.
    """
    cfg = load_config(config)
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA GPU; use device='cpu'")
    model_dir = resolve_model_dir(model)
    if (model_dir / MANIFEST).exists():
        from .prequantized import load_prequantized

        # The raw config: only keys the caller set override the checkpoint's, and only offload.* / max_context.
        return load_prequantized(model_dir, config, device, progress)
    hf_config = read_config(model_dir)
    checkpoint = SafetensorsCheckpoint(model_dir)
    engine = build_engine(hf_config, cfg, device, checkpoint_loader(checkpoint, hf_config, cfg, device), progress)
    engine.tokenizer = load_tokenizer(model_dir)
    engine.model_dir = model_dir
    return engine


def build_engine(hf_config, cfg: EngineConfig, device: torch.device, source, progress: bool) -> Engine:
    """Allocate the cache and trunk, then let `source` fill them (from full-precision or pre-quantized weights)."""
    anatomy = Anatomy.of(hf_config, cfg.torch_dtype)
    check_config_for_model(cfg, anatomy)
    layout = anatomy.expert_layout(cfg)
    k = resolve_experts_on_device(cfg, hf_config, device)
    cfg = cfg.replace(experts_on_device=k)
    trunk = [t.layout(cfg) for t in anatomy.quantized()]
    kernels, warmup_s = _ready_kernels(cfg.kernels, device, [*layout.matrices.values(), *trunk])
    cache = ExpertCache(len(anatomy.moe_layers), anatomy.num_experts, layout.nbytes, k, cfg.offload.prefetch, device,
                        cfg.offload.policy)
    model = OffloadedModel(hf_config, anatomy, cache, layout, cfg.torch_dtype, device, kernels)
    source(model, layout, progress)
    model.finish_loading()
    return Engine(model, cfg, kernel_warmup_s=warmup_s)


def _ready_kernels(choice: str, device: torch.device, layouts: list[MatrixLayout]) -> tuple[Kernels, float]:
    """The configured kernels, compiled for every matrix shape now so that the first reply does not stall.
    Under `auto`, kernels that fail to compile here give way to the reference ones with one warning."""
    kernels = select_kernels(choice, device, layouts)
    try:
        return kernels, warm_up(kernels, layouts, device)
    except Exception as e:  # a broken compiler toolchain, a Triton/driver mismatch, ...
        if choice == "fused":
            raise ConfigError(f"kernels: fused failed to compile on {device} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); use kernels: auto or reference") from e
        warnings.warn(f"fused kernels failed to compile on {device} ({type(e).__name__}); using the reference "
                      "kernels (dequantize + matmul), which are several times slower", RuntimeWarning, stacklevel=3)
        return REFERENCE, 0.0


def check_config_for_model(cfg: EngineConfig, anatomy: Anatomy) -> None:
    """The config rules that need the model's shapes, checked before anything is allocated."""
    E = anatomy.num_experts
    if cfg.offload.prefetch > E:
        raise ConfigError(f"offload.prefetch is {cfg.offload.prefetch}, but this model has {E} experts per layer: "
                          f"use 0 (off) to {E}")
    try:
        anatomy.expert_layout(cfg)
    except QuantizationError as e:
        raise ConfigError(f"quant.experts.group_size {cfg.quant.experts.group_size} does not fit this model: "
                          f"{e}") from None
    for tensor in anatomy.quantized():
        try:
            tensor.layout(cfg)
        except QuantizationError as e:
            spec = getattr(cfg.quant, tensor.part)
            raise ConfigError(f"quant.{tensor.part}.group_size {spec.group_size} does not fit this model: "
                              f"{e}") from None


def checkpoint_loader(checkpoint: SafetensorsCheckpoint, hf_config, cfg: EngineConfig, device: torch.device):
    """Fill a model from a full-precision checkpoint, quantizing tensor by tensor (on the GPU when there is one)."""
    quant_device = device if device.type == "cuda" else torch.device("cpu")

    def fill(model: OffloadedModel, layout: ExpertLayout, progress: bool) -> None:
        anatomy, renames = model.anatomy, model.family.renames
        by_layer: dict[int | None, list] = {}
        for tensor in anatomy.trunk:
            by_layer.setdefault(tensor.layer, []).append(tensor)
        moe_index = {l: m for m, l in enumerate(anatomy.moe_layers)}
        for l in tqdm([None, *range(hf_config.num_hidden_layers)], desc="quantizing layers", disable=not progress):
            for tensor in by_layer.get(l, []):
                if tensor.part is None:
                    model.set_tensor(tensor.name, checkpoint.trunk(tensor.name, tensor.shape, renames),
                                     tensor.dtype(cfg))
                    continue
                weight = checkpoint.trunk(f"{tensor.name}.weight", tensor.shape, renames)
                linear, buffer = quantize_matrix(weight.to(quant_device, cfg.torch_dtype),
                                                 getattr(cfg.quant, tensor.part), cfg.torch_dtype)
                model.set_linear(tensor.name, linear, buffer)
            if l not in moe_index:
                continue
            for e in range(anatomy.num_experts):
                weights = {name: read_expert_tensor(checkpoint, anatomy, l, e, name).to(quant_device, cfg.torch_dtype)
                           for name in layout.names}
                model.cache.fill(moe_index[l], e, lambda buffer: layout.pack(weights, buffer))
                checkpoint.close()  # unmap the source shards, or their pages stay resident (host RAM is scarce)

    return fill


def load_tokenizer(model_dir: Path):
    """The checkpoint's own tokenizer, or None when it ships none (logits and token-id generation still work)."""
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
