"""Continuous batching (the mechanism): sequences, each with its own KV cache, sampler and limits, share every
forward step; a sequence joins at the next step and leaves when it ends, the others carry on untouched.

    batch = Batch(model, max_batch=8)
    batch.add(sequence)                      # joins at the next step
    while batch:
        for sequence, token in batch.step(): # one forward for all of them (OffloadedModel.step)
            ...                              # token: a new generated token, or None when it ended without one

A step holds one token per decoding sequence plus prefill chunks of those still reading their prompt, at most
`prefill_chunk` prompt tokens in all (the first waiting chunk always goes), so a long prompt neither stalls the
others for long nor needs more activation memory than one chunk (memory.py plans for it). A prompt is cut at
multiples of `prefill_chunk` counted from its own start, whatever else is in the batch: a sequence so runs exactly
the forwards it runs alone, and since attention runs per sequence (ragged.py) and every other layer is
row-wise, it generates the tokens it generates alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from .memory import MAX_BATCH, PREFILL_CHUNK
from .model import OffloadedModel
from .ragged import Segment


@dataclass(eq=False)
class Generation:
    """One generation: `prompt` is prefilled on top of what `kv_cache` already holds, then up to `max_new_tokens`
    tokens are picked by `pick(logits [V]) -> token` (the sequence's own sampler, with its own generator). An EOS
    token ends it without being generated; with `feed_eos` it is run through the model first, so that the cache
    holds it (a chat's next turn starts after it)."""
    prompt: list[int]
    kv_cache: DynamicCache
    pick: Callable[[torch.Tensor], int]
    max_new_tokens: int
    eos: frozenset[int] = frozenset()
    feed_eos: bool = False
    tokens: list[int] = field(default_factory=list)  # generated so far (EOS excluded)
    finish_reason: str | None = None  # "stop" (EOS) | "length" | "cancelled" | "error"
    prefilled: int = 0  # prompt tokens in the cache
    next_input: int | None = None  # the token the next step feeds (the last one picked)

    def cancel(self) -> None:
        """End it before the next step (a stop string was seen, its client went away)."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Batch:
    def __init__(self, model: OffloadedModel, max_batch: int = MAX_BATCH, prefill_chunk: int = PREFILL_CHUNK):
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch} and {prefill_chunk}")
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, prefill_chunk
        self.active: list[Generation] = []  # in the order they joined
        self.last_size = 0  # sequences in the latest step (metrics)

    def __len__(self) -> int:
        return sum(not s.finished for s in self.active)

    @property
    def room(self) -> int:
        """Free places: a sequence cancelled between steps has left already."""
        return self.max_batch - len(self)

    def add(self, sequence: Generation) -> None:
        self.active = [s for s in self.active if not s.finished]
        if not self.room:
            raise RuntimeError(f"the batch is full ({self.max_batch} sequences): wait for one to finish")
        if not sequence.prompt and sequence.next_input is None:
            raise ValueError("a sequence needs at least one prompt token")
        self.active.append(sequence)

    def step(self) -> list[tuple[Generation, int | None]]:
        """Run one forward for every active sequence that has work in it. Returns (sequence, new token) for each
        sequence that generated a token, and (sequence, None) for each that ended without one; ended sequences
        have left the batch. If the forward raises, every sequence in it ends with "error" and leaves, and the
        exception propagates (the others, waiting for a prefill slot, stay)."""
        self.active = [s for s in self.active if not s.finished]
        chosen, segments, budget = [], [], self.prefill_chunk
        for seq in self.active:
            if seq.prefilled < len(seq.prompt):
                n = min(self.prefill_chunk, len(seq.prompt) - seq.prefilled)  # chunks start at multiples of it
                if n > budget and budget < self.prefill_chunk:
                    continue  # no room for this chunk in this step's prefill budget: the next step
                budget -= n
                ids = seq.prompt[seq.prefilled : seq.prefilled + n]
                segments.append(Segment(ids, seq.kv_cache, "last" if seq.prefilled + n == len(seq.prompt) else "none"))
            else:
                feeding_eos = seq.next_input in seq.eos
                segments.append(Segment([seq.next_input], seq.kv_cache, "none" if feeding_eos else "last"))
            chosen.append(seq)
        if not chosen:
            return []
        self.last_size = len(chosen)
        try:
            logits = self.model.step(segments)
        except BaseException:
            for seq in chosen:
                seq.finish_reason = "error"
            self.active = [s for s in self.active if not s.finished]
            raise
        events = []
        for seq, segment, row in zip(chosen, segments, logits):
            if seq.prefilled < len(seq.prompt):
                seq.prefilled += len(segment.ids)
            if row is None:
                if seq.prefilled == len(seq.prompt):  # not a prefill chunk: the EOS was fed
                    seq.finish_reason = "stop"
                    events.append((seq, None))
                continue
            token = seq.pick(row)
            if token in seq.eos:
                if seq.feed_eos:
                    seq.next_input = token
                    continue
                seq.finish_reason = "stop"
                events.append((seq, None))
                continue
            seq.tokens.append(token)
            seq.next_input = token
            if len(seq.tokens) >= seq.max_new_tokens:
                seq.finish_reason = "length"
            events.append((seq, token))
        self.active = [s for s in self.active if not s.finished]
        return events
