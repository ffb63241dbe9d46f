"""Per-layer expert-cache eviction policies, shared by the engine's cache and the simulator.

One policy object serves one MoE layer. The cache calls

* ``touch(e)`` on every lookup of expert ``e`` (a hit, or a miss once ``e`` has been loaded),
* ``victim(candidates)`` when the cache is full and must drop one of ``candidates`` (resident experts that the
  current token does not need at this layer), and
* ``evicted(e)`` when ``e`` has left the cache.

Policies only see this online stream, are deterministic (ties break on recency, then on the lower expert id), and
keep O(num_experts) state.

``lru``   evicts the least recently touched candidate (the engine's default).
``lfu``   evicts the least touched candidate (counts survive eviction), ties to the least recent.
``lrfu``  (this project's design) evicts the candidate with the lowest *decayed touch count*: every touch adds 1 to
          an expert's score and all scores halve every ``half_life`` touches (64 by default, i.e. ~32 tokens at
          top-2). It sits between LFU (half_life -> inf) and LRU (half_life -> 0): on real Mixtral routing an
          expert's long-run popularity predicts its next use better than its last use does, but popularity drifts
          over a generation, so old counts must fade. See benchmarks/simulate_results.md.
"""

from __future__ import annotations

from typing import Callable, Dict, Protocol, Sequence, runtime_checkable

__all__ = [
    "EvictionPolicy",
    "LRUPolicy",
    "LFUPolicy",
    "LRFUPolicy",
    "POLICIES",
    "make_policy",
]


@runtime_checkable
class EvictionPolicy(Protocol):
    """What an expert cache needs from an eviction policy (one instance per layer)."""

    def touch(self, expert: int) -> None:
        """Called on every lookup of ``expert`` (hit, or miss after it was loaded)."""

    def victim(self, candidates: Sequence[int]) -> int:
        """Choose which resident expert among ``candidates`` (non-empty) to evict."""

    def evicted(self, expert: int) -> None:
        """``expert`` left the cache."""


def _check_candidates(candidates: Sequence[int]) -> None:
    if len(candidates) == 0:
        raise ValueError("victim() needs at least one candidate")


class LRUPolicy:
    """Least recently used: evict the candidate whose last touch is oldest."""

    name = "lru"

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self._clock = 0
        self._last = [0] * num_experts  # 0 = never touched

    def touch(self, expert: int) -> None:
        self._clock += 1
        self._last[expert] = self._clock

    def victim(self, candidates: Sequence[int]) -> int:
        _check_candidates(candidates)
        last = self._last
        return min(candidates, key=lambda e: (last[e], e))

    def evicted(self, expert: int) -> None:
        pass  # recency of an evicted expert is irrelevant until it is touched again


class LFUPolicy:
    """Least frequently used: evict the candidate with the fewest touches so far (ties: least recent).

    Counts are kept across evictions (perfect LFU over the history of the layer).
    """

    name = "lfu"

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self._clock = 0
        self._last = [0] * num_experts
        self._count = [0] * num_experts

    def touch(self, expert: int) -> None:
        self._clock += 1
        self._last[expert] = self._clock
        self._count[expert] += 1

    def victim(self, candidates: Sequence[int]) -> int:
        _check_candidates(candidates)
        count, last = self._count, self._last
        return min(candidates, key=lambda e: (count[e], last[e], e))

    def evicted(self, expert: int) -> None:
        pass


class LRFUPolicy:
    """Decayed-frequency policy ("lrfu"): evict the candidate with the lowest exponentially decayed touch count.

    ``score(e) = sum over past touches i of e: 0.5 ** ((now - t_i) / half_life)``, with ``now`` counted in touches
    of this layer. Scores are stored lazily (value + time of last update) so a touch costs O(1) and a victim choice
    O(len(candidates)). Ties (e.g. never-touched experts) break to the least recent, then to the lower id.
    """

    name = "lrfu"

    def __init__(self, num_experts: int, half_life: float = 64.0) -> None:
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0, got {half_life!r}")
        self.num_experts = num_experts
        self.half_life = float(half_life)
        self._decay = 0.5 ** (1.0 / self.half_life)
        self._clock = 0
        self._last = [0] * num_experts
        self._score = [0.0] * num_experts

    def score(self, expert: int) -> float:
        """Current decayed touch count of ``expert``."""
        return self._score[expert] * self._decay ** (self._clock - self._last[expert])

    def touch(self, expert: int) -> None:
        value = self.score(expert)
        self._clock += 1
        self._score[expert] = value * self._decay + 1.0
        self._last[expert] = self._clock

    def victim(self, candidates: Sequence[int]) -> int:
        _check_candidates(candidates)
        last = self._last
        return min(candidates, key=lambda e: (self.score(e), last[e], e))

    def evicted(self, expert: int) -> None:
        pass  # the score keeps decaying while the expert is out; a reload continues from it


_FACTORIES: Dict[str, Callable[[int], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "lrfu": LRFUPolicy,
}

POLICIES: tuple[str, ...] = tuple(_FACTORIES)


def make_policy(name: str, num_experts: int) -> EvictionPolicy:
    """A fresh policy for one layer with ``num_experts`` experts. ``name`` is one of :data:`POLICIES`."""
    key = str(name).strip().lower()
    if key not in _FACTORIES:
        raise ValueError(f"unknown eviction policy {name!r}; valid names: {', '.join(POLICIES)}")
    if int(num_experts) < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts!r}")
    return _FACTORIES[key](int(num_experts))
