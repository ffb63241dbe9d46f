"""The expert cache's counters (`LayerStats`, one per MoE layer) and its rates, defined once: `Engine.stats()`,
offload-chat's stats line and /stats, the server's /metrics and scripts/profile_cache.py all take them from here,
and print them with their parts.

    hit rate            hits / lookups
    prefetch precision  guesses the layer then used / guesses (experts named by speculation, resident or not)
    prefetch recall     guesses the layer then used / experts used by layers a guess was made for

Copies are counted apart (`prefetch_issued`: experts copied ahead of need; `prefetch_used`: ... that a lookup then
found staged; `prefetch_wasted`): a guess of an expert already on the device copies nothing, so precision is not
used / issued.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Iterable, Mapping


@dataclass
class LayerStats:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetch_issued: int = 0  # experts copied ahead of need
    prefetch_used: int = 0  # ... that a later lookup found staged
    prefetch_wasted: int = 0  # ... dropped unused
    guessed: int = 0  # experts named by speculation (resident or not)
    guessed_correct: int = 0  # ... that the layer then really used
    needed_after_guess: int = 0  # experts used by layers for which a guess had been made
    bytes_h2d: int = 0
    bytes_d2h: int = 0
    wait_s: float = 0.0  # host time spent waiting for an in-flight copy (CUDA, only when `timing` is set)
    cpu_computed: int = 0  # misses computed on the CPU from their host slot (hybrid execution), not copied
    cpu_ms: float = 0.0  # the CPU worker's time computing them (milliseconds)

    def add(self, other: "LayerStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(frozen=True)
class Ratio:
    part: int
    whole: int

    @property
    def value(self) -> float:
        """part / whole; 0.0 when there is nothing to divide by."""
        return self.part / self.whole if self.whole else 0.0

    def percent(self) -> str:
        return f"{100 * self.value:.1f}%" if self.whole else "n/a"


def hit_rate(s: LayerStats) -> Ratio:
    return Ratio(s.hits, s.lookups)


def prefetch_precision(s: LayerStats) -> Ratio:
    return Ratio(s.guessed_correct, s.guessed)


def prefetch_recall(s: LayerStats) -> Ratio:
    return Ratio(s.guessed_correct, s.needed_after_guess)


def precision_text(s: LayerStats) -> str:
    """e.g. 'prefetch precision 71.4% (15 of 21 guesses used)'."""
    r = prefetch_precision(s)
    return f"prefetch precision {r.percent()} ({r.part} of {r.whole} guesses used)"


def recall_text(s: LayerStats) -> str:
    """e.g. 'recall 41.7% (15 of 36 experts used were guessed)'."""
    r = prefetch_recall(s)
    return f"recall {r.percent()} ({r.part} of {r.whole} experts used were guessed)"


def total(per_layer: Iterable[LayerStats]) -> LayerStats:
    out = LayerStats()
    for s in per_layer:
        out.add(s)
    return out


def counters(d: Mapping) -> LayerStats:
    """The LayerStats in a dict that holds its fields (an `Engine.stats()` entry, a profile report's row)."""
    return LayerStats(**{f.name: d[f.name] for f in fields(LayerStats)})


def difference(after: Mapping, before: Mapping) -> LayerStats:
    """What the counters added between two `Engine.stats()` entries."""
    return LayerStats(**{f.name: after[f.name] - before[f.name] for f in fields(LayerStats)})


def with_rates(s: LayerStats) -> dict:
    """The counters and their rates as plain data (`Engine.stats()`'s entries)."""
    return {**asdict(s), "hit_rate": hit_rate(s).value, "prefetch_precision": prefetch_precision(s).value,
            "prefetch_recall": prefetch_recall(s).value}
