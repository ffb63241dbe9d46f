"""The generate loop: prefill, then decode one token at a time with a KV cache; sampling; streaming text.

    tokens = generate_tokens(model, prompt_ids, params, kv_cache)   # an iterator of token ids
    for piece in stream_text(tokens, tokenizer, params.stop): ...   # text pieces, stop strings removed
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterable, Iterator, Sequence

import torch
from transformers import DynamicCache

from .model import OffloadedMixtral


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (CTRL-style)
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError("top_k must be >= 0 and repetition_penalty > 0")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @staticmethod
    def from_kwargs(**kwargs) -> "SamplingParams":
        known = {f.name for f in fields(SamplingParams)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown sampling option(s) {unknown}; valid: {sorted(known)}")
        if "stop" in kwargs and kwargs["stop"] is not None and not isinstance(kwargs["stop"], str):
            kwargs["stop"] = tuple(kwargs["stop"])
        return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})


def sample(logits: torch.Tensor, params: SamplingParams, context: Sequence[int], generator: torch.Generator) -> int:
    """Pick the next token from float32 logits [V]: repetition penalty, then temperature, top-k, top-p."""
    logits = logits.clone()
    if params.repetition_penalty != 1.0 and context:
        seen = torch.tensor(sorted(set(context)), device=logits.device)
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    if params.temperature == 0 or params.top_k == 1:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the token that crosses top_p
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return generator


@torch.inference_mode()
def generate_tokens(model: OffloadedMixtral, new_ids: Sequence[int], params: SamplingParams, kv_cache: DynamicCache,
                    eos_ids: Iterable[int] = (), context: Sequence[int] = (), feed_eos: bool = False) -> Iterator[int]:
    """Prefill `new_ids` on top of `kv_cache`, then yield up to max_new_tokens sampled tokens. EOS ends it and
    is not yielded; with `feed_eos` it is run through the model so the cache holds it (a chat's next turn
    starts after it). `context`: the tokens already in the cache, for the repetition penalty."""
    eos = set(eos_ids)
    generator = make_generator(params.seed)
    history = list(context) + list(new_ids)
    logits = model(torch.tensor([list(new_ids)]), kv_cache)[0, -1]  # [V]
    for step in range(params.max_new_tokens):
        token = sample(logits, params, history, generator)
        if token in eos:
            if feed_eos:
                model(torch.tensor([[token]]), kv_cache)
            return
        yield token
        history.append(token)
        if step + 1 < params.max_new_tokens:
            logits = model(torch.tensor([[token]]), kv_cache)[0, -1]


class StreamDecoder:
    """Incremental detokenization: emits text only when it is final, so multi-byte characters split across
    tokens are never broken and sentencepiece's leading spaces are kept (decode a window that starts a few
    tokens back and emit what it adds beyond the previous window)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix, self.read = 0, 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self.ids[self.prefix : self.read])
        after = decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (e.g. a lone incomplete byte sequence)."""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before, after = decode(self.ids[self.prefix : self.read]), decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


def stream_text(tokens: Iterable[int], tokenizer, stop: Sequence[str] = ()) -> Iterator[str]:
    """Text pieces for a token stream, ending before the first stop string (which is not emitted). A generator
    `tokens` is closed when this stream ends or is closed, which stops generation."""
    try:
        yield from _text_pieces(tokens, tokenizer, stop)
    finally:
        if hasattr(tokens, "close"):
            tokens.close()


def _text_pieces(tokens: Iterable[int], tokenizer, stop: Sequence[str]) -> Iterator[str]:
    decoder = StreamDecoder(tokenizer)
    held = ""  # text that might be the start of a stop string
    hold_back = max((len(s) for s in stop), default=1) - 1
    for token in tokens:
        held += decoder.push(token)
        if stop:
            hits = [held.find(s) for s in stop if s in held]
            if hits:
                if held[: min(hits)]:
                    yield held[: min(hits)]
                return
        if len(held) > hold_back:
            cut = len(held) - hold_back
            yield held[:cut]
            held = held[cut:]
    held += decoder.flush()
    if stop:
        hits = [held.find(s) for s in stop if s in held]
        held = held[: min(hits)] if hits else held
    if held:
        yield held
