"""The generate loop: prefill, then decode one token at a time with a KV cache; sampling; streaming text.

    tokens = generate_tokens(model, prompt_ids, params, kv_cache)   # an iterator of token ids
    for piece in stream_text(tokens, tokenizer, params.stop): ...   # text pieces, stop strings removed
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Iterable, Iterator, Sequence

import torch
from transformers import DynamicCache

from .model import OffloadedModel


class ParameterTypeError(TypeError, ValueError):
    """A parameter of the wrong type. Also a ValueError, so callers that turn bad values into one-line errors
    (the CLI, a server's 400 response) catch it with the rest."""


def check_int(name: str, value, low: int, high: int | None = None, allowed: str | None = None) -> int:
    """`value` as an int in [low, high]; floats (even 2.0), strings and bools are refused, naming `name`."""
    allowed = allowed or (f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ParameterTypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return int(value)


def check_float(name: str, value, allowed: str, ok) -> float:
    """`value` as a finite float for which `ok(value)` holds; `allowed` says what that is."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParameterTypeError(f"{name} must be a number ({allowed}), got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return float(value)


SEED_RANGE = (-(2**63), 2**64 - 1, "an integer from -2**63 to 2**64-1")  # what torch's manual_seed accepts
# Temperatures below this sample greedily (as vLLM does): dividing the logits by less (a subnormal 5e-324 most of all)
# overflows them to inf, and even where it does not, the softmax is one-hot on the top token.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy; so is anything below GREEDY_BELOW (stored as 0.0)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (CTRL-style)
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        """Types, ranges and NaN checked here, at the boundary: errors name the parameter and what is allowed."""
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        put("max_new_tokens", check_int("max_new_tokens", self.max_new_tokens, 1))
        temperature = check_float("temperature", self.temperature, ">= 0 (0 = greedy)", lambda t: t >= 0)
        put("temperature", 0.0 if temperature < GREEDY_BELOW else temperature)
        put("top_p", check_float("top_p", self.top_p, "in (0, 1]", lambda p: 0 < p <= 1))
        put("top_k", check_int("top_k", self.top_k, 0))
        put("repetition_penalty", check_float("repetition_penalty", self.repetition_penalty, "> 0 (1 = off)",
                                              lambda r: r > 0))
        if self.seed is not None:
            put("seed", check_int("seed", self.seed, *SEED_RANGE))
        put("stop", check_stop(self.stop))

    @staticmethod
    def from_kwargs(**kwargs) -> "SamplingParams":
        known = {f.name for f in fields(SamplingParams)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ParameterTypeError(f"unknown sampling option(s) {unknown}; valid: {sorted(known)}")
        return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})


def check_token_ids(ids, vocab_size: int) -> list[int]:
    """Token ids (a list or tuple of ints, or an integer tensor/array) -> a flat list of ints in [0, vocab_size).
    Floats are refused rather than truncated; an id out of range is named with its position."""
    dtype = getattr(ids, "dtype", None)
    if dtype is not None:  # a torch tensor or numpy array: check the element type once
        is_int = (not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
                  if isinstance(dtype, torch.dtype) else getattr(dtype, "kind", "") in "iu")
        if not is_int:
            raise ParameterTypeError(f"token ids must be integers, got a {dtype} array; convert them with .long()")
        flat = [int(t) for t in ids.reshape(-1).tolist()]
    elif isinstance(ids, (list, tuple)):
        flat = []
        for t in ids:
            if isinstance(t, torch.Tensor) and t.dim() == 0 and not t.is_floating_point():
                t = t.item()
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise ParameterTypeError(f"token ids must be integers, got {t!r} ({type(t).__name__}) at position "
                                         f"{len(flat)}")
            flat.append(int(t))
    else:
        raise ParameterTypeError(f"token ids must be a list of integers, got {type(ids).__name__}")
    for position, t in enumerate(flat):
        if not 0 <= t < vocab_size:
            raise ValueError(f"token id {t} at position {position} is outside the vocabulary of {vocab_size} tokens "
                             f"(valid ids: 0 to {vocab_size - 1})")
    return flat


def check_stop(stop) -> tuple[str, ...]:
    """A stop string or a list of them -> a tuple of non-empty strings."""
    items = (stop,) if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise ParameterTypeError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(not s for s in items):
        raise ValueError("stop strings must be non-empty")
    return tuple(items)


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
def generate_tokens(model: OffloadedModel, new_ids: Sequence[int], params: SamplingParams, kv_cache: DynamicCache,
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
