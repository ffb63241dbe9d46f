"""Generation: sampling parameters and sampling, the generate loops over batch.py's scheduler, streaming text.

    tokens = generate_tokens(model, prompt_ids, params, kv_cache)   # an iterator of token ids
    for piece in stream_text(tokens, tokenizer, params.stop): ...   # text pieces, stop strings removed
    for index, piece in stream_batch(model, sequences, tokenizer, stops, max_batch): ...   # many at once
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Iterable, Iterator, Sequence

import torch
from transformers import DynamicCache

from .batch import Batch, Generation
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


def is_batch(prompt) -> bool:
    """A list of prompts (strings, token-id lists or 1-d tensors) rather than one prompt (a string, token ids)."""
    if not isinstance(prompt, (list, tuple)) or not prompt:
        return False
    first = prompt[0]
    return isinstance(first, (str, list, tuple)) or getattr(first, "ndim", 0) >= 1


def per_prompt_options(options: dict, n: int) -> list[dict]:
    """Sampling options for each of `n` prompts: a list value holds one value per prompt, anything else is shared.
    `stop` is per prompt only as a list of lists (a list of strings is the stop strings of every prompt)."""
    each: list[dict] = [{} for _ in range(n)]
    for name, value in options.items():
        per_prompt = isinstance(value, (list, tuple)) and (
            name != "stop" or (bool(value) and all(v is None or isinstance(v, (list, tuple)) for v in value)))
        if per_prompt and len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} prompts: give one value for all, or one per "
                             f"prompt")
        for i in range(n):
            each[i][name] = value[i] if per_prompt else value
    return each


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
    # Inverse CDF with one uniform draw from the sequence's generator: ~0.04 ms over 32000 tokens where
    # torch.multinomial took ~0.66 ms, ~15 % of a step that samples 8 sequences on CPU. float64, so that the sum
    # over the vocabulary keeps every token's share; a token that top-k / top-p removed adds nothing to the CDF.
    probs = torch.softmax(logits, dim=-1).cpu().double()  # [V]: float32 over a link, summed in float64 here
    cdf = probs.cumsum(0)  # [V]
    u = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
    token = int(torch.searchsorted(cdf, u, right=True))
    return token if token < len(cdf) else int(probs.nonzero()[-1])  # u rounded up to the total: the last token left


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return generator


class Sampler:
    """One sequence's `pick`: its parameters, its own generator (so a seeded sequence samples the same tokens in
    any batch) and its context for the repetition penalty, which grows with each token picked."""

    def __init__(self, params: SamplingParams, context: Sequence[int]):
        self.params, self.history, self.generator = params, list(context), make_generator(params.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        token = sample(logits, self.params, self.history, self.generator)
        self.history.append(token)
        return token


def new_sequence(prompt: Sequence[int], params: SamplingParams, kv_cache: DynamicCache, eos_ids: Iterable[int] = (),
                 context: Sequence[int] = (), feed_eos: bool = False) -> Generation:
    """A sequence that prefills `prompt` on top of `kv_cache` (which holds `context`) and samples with `params`."""
    return Generation(list(prompt), kv_cache, Sampler(params, [*context, *prompt]), params.max_new_tokens,
                      frozenset(eos_ids), feed_eos)


def generate_tokens(model: OffloadedModel, new_ids: Sequence[int], params: SamplingParams, kv_cache: DynamicCache,
                    eos_ids: Iterable[int] = (), context: Sequence[int] = (), feed_eos: bool = False) -> Iterator[int]:
    """Prefill `new_ids` on top of `kv_cache`, then yield up to max_new_tokens sampled tokens. EOS ends it and
    is not yielded; with `feed_eos` it is run through the model so the cache holds it (a chat's next turn
    starts after it). `context`: the tokens already in the cache, for the repetition penalty. A batch of one:
    the same steps, prefill chunks included, as each sequence of a batch runs."""
    batch = Batch(model, max_batch=1)
    batch.add(new_sequence(new_ids, params, kv_cache, eos_ids, context, feed_eos))
    while batch:
        for _, token in batch.step():
            if token is not None:
                yield token


def generate_batch(model: OffloadedModel, sequences: list[Generation],
                   max_batch: int) -> Iterator[tuple[int, int | None]]:
    """Run `sequences` with at most `max_batch` at a time, each joining as soon as there is room: (index, token)
    as tokens are generated, and (index, None) when a sequence ends without one. A sequence cancelled meanwhile
    (`Generation.cancel`) leaves at the next step; one cancelled before its turn never starts."""
    batch = Batch(model, max_batch)
    waiting = deque(range(len(sequences)))
    index = {id(seq): i for i, seq in enumerate(sequences)}
    while waiting or batch:
        while waiting and batch.room:
            seq = sequences[waiting.popleft()]
            if not seq.finished:
                batch.add(seq)
        for seq, token in batch.step():
            yield index[id(seq)], token


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


class TextStream:
    """One sequence's text, pushed token by token: pieces are held back while they might begin a stop string,
    and the first stop string ends it (`stopped`; the stop string is not emitted)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.decoder, self.stop = StreamDecoder(tokenizer), tuple(stop)
        self.held = ""  # text that might be the start of a stop string
        self.hold_back = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False

    def _cut_at_stop(self) -> bool:
        hits = [self.held.find(s) for s in self.stop if s in self.held]
        if hits:
            self.held, self.stopped = self.held[: min(hits)], True
        return bool(hits)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.held += self.decoder.push(token)
        if self.stop and self._cut_at_stop():
            piece, self.held = self.held, ""
            return piece
        if len(self.held) > self.hold_back:
            cut = len(self.held) - self.hold_back
            piece, self.held = self.held[:cut], self.held[cut:]
            return piece
        return ""

    def finish(self) -> str:
        """What is still held back once the tokens end."""
        if self.stopped:
            return ""
        self.held += self.decoder.flush()
        if self.stop:
            self._cut_at_stop()
        piece, self.held = self.held, ""
        return piece


def stream_text(tokens: Iterable[int], tokenizer, stop: Sequence[str] = ()) -> Iterator[str]:
    """Text pieces for a token stream, ending before the first stop string (which is not emitted). A generator
    `tokens` is closed when this stream ends or is closed, which stops generation."""
    text = TextStream(tokenizer, stop)
    try:
        for token in tokens:
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                return
        piece = text.finish()
        if piece:
            yield piece
    finally:
        if hasattr(tokens, "close"):
            tokens.close()


def stream_batch(model: OffloadedModel, sequences: list[Generation], tokenizer, stops: list[Sequence[str]],
                 max_batch: int) -> Iterator[tuple[int, str]]:
    """(index, text piece) for a batch, each sequence ending at its first stop string (`stops[index]`), which
    then leaves the batch at the next step."""
    texts = [TextStream(tokenizer, stop) for stop in stops]
    tokens = generate_batch(model, sequences, max_batch)
    try:
        for i, token in tokens:
            piece = texts[i].push(token) if token is not None else ""
            if texts[i].stopped:
                sequences[i].cancel()
            elif sequences[i].finished:
                piece += texts[i].finish()
            if piece:
                yield i, piece
    finally:
        tokens.close()
