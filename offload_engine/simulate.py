"""Replay expert-routing traces through a per-layer expert cache of ``k`` slots.

Traces are int arrays ``[tokens, layers, top_k]`` of expert ids, ``-1`` marking a missing record. They come from the
shared npz files (``<set>_pN_experts`` arrays) or from a profiler JSON report (``{"routing": [token][layer][slot]}``).

Replay semantics (identical to the engine's cache): every layer starts empty; per token, per layer, the token's experts
are looked up in routed order, skipping ``-1``. ``lookup(e)``: resident -> hit, ``policy.touch(e)``; otherwise miss:
with a free slot take it, else evict ``policy.victim(candidates)`` where candidates are the resident experts minus the
ones this token uses at this layer (already used or still to come; if that leaves none, which needs ``k < top_k``,
only those still to come; if none is left even then, ``e`` is used in place and not cached), then ``policy.evicted(victim)``, load ``e`` and ``policy.touch(e)``. Counters are per layer.

``belady`` evicts the candidate whose next use in the layer's lookup stream is furthest away (same protections).

Oracle prefetch (``prefetch=True``): before the lookups of layer ``l`` for token ``t``, the experts that lookup will
need and that are not resident are copied into up to ``top_k`` extra staging slots, so their lookups count as
``prefetch_hits``. A staged expert displaces nothing until it is used; then it takes the policy victim's place, exactly
as a miss would, so the cache evolves as without prefetch and host-to-device loads are unchanged: the prefetch hides
copy latency, it does not save copies. (With ``k < top_k`` a needed expert can be evicted by the token's own other
expert within the layer; the oracle knows that and stages it too, so every lookup of a prefetched layer hits.) Layer 0 is not prefetched by default (``prefetch_first_layer``): no layer runs
before it inside a token, and the token it routes is only known once the previous token has been sampled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .policy import POLICIES, EvictionPolicy, make_policy

__all__ = [
    "BELADY",
    "LayerStats",
    "ReplayResult",
    "HitRateTable",
    "BeladyPolicy",
    "default_trace_paths",
    "load_npz",
    "routing_from_report",
    "load_profile_json",
    "load_traces",
    "replay",
    "replay_many",
    "hit_rate_table",
]

BELADY = "belady"
PathLike = Union[str, "os.PathLike[str]"]
PolicySpec = Union[str, Callable[[int], EvictionPolicy]]
TraceSource = Union[Mapping[str, np.ndarray], PathLike, Sequence[PathLike]]


@dataclass
class LayerStats:
    """Counters of one layer's cache."""

    hits: int = 0  # lookups served by the k-slot cache
    misses: int = 0  # lookups that had to wait for a copy
    evictions: int = 0
    prefetch_hits: int = 0  # lookups served by the oracle prefetch's staging slots (each one a copy, too)

    @property
    def lookups(self) -> int:
        return self.hits + self.misses + self.prefetch_hits

    @property
    def hit_rate(self) -> float:
        return (self.hits + self.prefetch_hits) / self.lookups if self.lookups else 0.0

    def add(self, other: "LayerStats") -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.evictions += other.evictions
        self.prefetch_hits += other.prefetch_hits


@dataclass
class ReplayResult:
    """Replay of one or more traces (summed) through one policy, ``k`` slots per layer."""

    policy: str
    k: int
    prefetch: bool
    layers: List[LayerStats]
    tokens: int = 0
    problems: Tuple[str, ...] = ()

    def _sum(self, attr: str) -> int:
        return sum(getattr(s, attr) for s in self.layers)

    hits = property(lambda self: self._sum("hits"))
    misses = property(lambda self: self._sum("misses"))
    evictions = property(lambda self: self._sum("evictions"))
    prefetch_hits = property(lambda self: self._sum("prefetch_hits"))
    lookups = property(lambda self: self._sum("lookups"))

    @property
    def loads(self) -> int:
        """Host-to-device expert copies (misses plus prefetched experts)."""
        return self.misses + self.prefetch_hits

    @property
    def hit_rate(self) -> float:
        n = self.lookups
        return (self.hits + self.prefetch_hits) / n if n else 0.0

    def hit_rate_per_layer(self) -> List[float]:
        return [s.hit_rate for s in self.layers]

    def merge(self, other: "ReplayResult") -> "ReplayResult":
        """A new result summing ``self`` and ``other`` layer by layer (same policy, k and mode)."""
        if (self.policy, self.k, self.prefetch) != (other.policy, other.k, other.prefetch):
            raise ValueError("can only merge results of the same policy, k and prefetch mode")
        n = max(len(self.layers), len(other.layers))
        layers = [LayerStats() for _ in range(n)]
        for src in (self.layers, other.layers):
            for i, s in enumerate(src):
                layers[i].add(s)
        return ReplayResult(self.policy, self.k, self.prefetch, layers, self.tokens + other.tokens,
                            self.problems + other.problems)


class BeladyPolicy:
    """Belady's optimal eviction for one layer, given the layer's whole lookup stream in advance.

    Follows the :class:`~offload_engine.policy.EvictionPolicy` protocol: the ``i``-th ``touch`` must be the ``i``-th
    lookup of ``stream``. ``victim`` returns the candidate used furthest in the future (never again counts as
    infinitely far; ties go to the lower id).
    """

    name = BELADY

    def __init__(self, stream: Sequence[int], num_experts: int) -> None:
        self._stream = list(stream)
        never = len(self._stream)
        self._next_at = [never] * len(self._stream)  # next position of the same expert after position i
        upcoming: Dict[int, int] = {}
        for i in range(len(self._stream) - 1, -1, -1):
            e = self._stream[i]
            self._next_at[i] = upcoming.get(e, never)
            upcoming[e] = i
        self._next_use = [upcoming.get(e, never) for e in range(num_experts)]
        self._pos = 0

    def touch(self, expert: int) -> None:
        if self._pos >= len(self._stream) or self._stream[self._pos] != expert:
            raise RuntimeError(f"BeladyPolicy: touch({expert}) does not follow the stream at position {self._pos}")
        self._next_use[expert] = self._next_at[self._pos]
        self._pos += 1

    def victim(self, candidates: Sequence[int]) -> int:
        nxt = self._next_use
        return max(candidates, key=lambda e: (nxt[e], -e))

    def evicted(self, expert: int) -> None:
        pass


def _shared_routing_dir() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "routing"


def default_trace_paths() -> List[Path]:
    """The shared npz routing traces (``../shared/data/routing/*.npz`` from the repository root), sorted."""
    d = _shared_routing_dir()
    return sorted(d.glob("*.npz")) if d.is_dir() else []


def load_npz(path: PathLike) -> Dict[str, np.ndarray]:
    """``{problem: experts[tokens, layers, top_k]}`` from an npz holding ``<problem>_experts`` arrays."""
    out: Dict[str, np.ndarray] = {}
    with np.load(path) as data:
        for key in sorted(data.files):
            if key.endswith("_experts"):
                arr = np.asarray(data[key])
                if arr.ndim != 3:
                    raise ValueError(f"{path}: {key} has shape {arr.shape}, expected [tokens, layers, top_k]")
                out[key[: -len("_experts")]] = arr.astype(np.int64)
    if not out:
        raise ValueError(f"{path}: no '<problem>_experts' arrays found")
    return out


def routing_from_report(report: Mapping) -> np.ndarray:
    """The ``routing`` of a profiler JSON report as ``[tokens, layers, top_k]`` ints.

    Schema: ``report["routing"][token][layer]`` is the list of expert ids routed to, in routed order. Ragged entries
    (a layer with fewer ids, a token with fewer layers) and ``null`` ids are padded with ``-1`` (missing).
    """
    if not isinstance(report, Mapping) or "routing" not in report:
        raise ValueError("profiler report must be a JSON object with a 'routing' key")
    tokens = report["routing"]
    if not isinstance(tokens, list):
        raise ValueError("report['routing'] must be a list of tokens, each a list of layers of expert ids")
    n_layers = max((len(t) for t in tokens), default=0)
    top_k = max((len(layer) for t in tokens for layer in t), default=0)
    out = np.full((len(tokens), n_layers, top_k), -1, dtype=np.int64)
    for ti, tok in enumerate(tokens):
        for li, layer in enumerate(tok):
            for si, e in enumerate(layer):
                out[ti, li, si] = -1 if e is None else int(e)
    return out


def load_profile_json(path: PathLike) -> Dict[str, np.ndarray]:
    """``{file stem: routing array}`` from a profiler JSON report (see :func:`routing_from_report`)."""
    with open(path, "r", encoding="utf-8") as fh:
        report = json.load(fh)
    return {Path(path).stem: routing_from_report(report)}


def load_traces(*paths: PathLike) -> Dict[str, np.ndarray]:
    """Load npz and/or profiler JSON traces into one ``{problem: array}`` (name clashes get ``file:`` prefixes)."""
    out: Dict[str, np.ndarray] = {}
    for p in paths:
        p = Path(p)
        loaded = load_profile_json(p) if p.suffix.lower() == ".json" else load_npz(p)
        for name, arr in loaded.items():
            out[f"{p.stem}:{name}" if name in out else name] = arr
    return out


def _as_traces(traces: TraceSource) -> Dict[str, np.ndarray]:
    if isinstance(traces, Mapping):
        return dict(traces)
    if isinstance(traces, (str, os.PathLike)):
        return load_traces(traces)
    return load_traces(*traces)


def _num_experts(trace: np.ndarray, num_experts: Optional[int]) -> int:
    top = int(trace.max()) + 1 if trace.size else 0
    n = max(8, top) if num_experts is None else int(num_experts)
    if top > n:
        raise ValueError(f"trace uses expert {top - 1} but num_experts={n}")
    return n


def _policy_name(policy: PolicySpec) -> str:
    if isinstance(policy, str):
        return policy.strip().lower()
    return str(getattr(policy, "name", getattr(policy, "__name__", repr(policy))))


def replay(trace: np.ndarray, k: int, policy: PolicySpec = "lru", *, prefetch: bool = False,
           prefetch_first_layer: bool = False, num_experts: Optional[int] = None, warm: bool = False,
           protect_used: bool = True, name: str = "") -> ReplayResult:
    """Replay one trace ``[tokens, layers, top_k]`` through a per-layer cache of ``k`` slots.

    ``policy``: a name from :data:`~offload_engine.policy.POLICIES`, ``"belady"``, or a factory
    ``num_experts -> EvictionPolicy`` (called once per layer). Repeated ids within one token and layer are looked up
    once. Variants (defaults = the semantics in the module docstring): ``warm=True`` starts every layer with experts
    ``0..k-1`` resident and touched in that order; ``protect_used=False`` protects only the experts the token still
    needs, not the ones it already used. If protection leaves no candidate (only possible when ``k < top_k``), only
    the experts still to come are protected; if that leaves none either, the expert is used in place without
    entering the cache, as the engine does.
    """
    trace = np.asarray(trace)
    if trace.ndim != 3:
        raise ValueError(f"trace must be [tokens, layers, top_k], got shape {trace.shape}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = int(k)
    n_tokens, n_layers, _ = trace.shape
    n_exp = _num_experts(trace, num_experts)
    pname = _policy_name(policy)
    initial = list(range(min(k, n_exp))) if warm else []
    rows_all = trace.tolist()
    layers: List[LayerStats] = []
    for layer in range(n_layers):
        rows = [list(dict.fromkeys(e for e in rows_all[t][layer] if e >= 0)) for t in range(n_tokens)]
        if pname == BELADY:
            pol: EvictionPolicy = BeladyPolicy(initial + [e for r in rows for e in r], n_exp)
        elif isinstance(policy, str):
            pol = make_policy(policy, n_exp)
        else:
            pol = policy(n_exp)
        touch, choose, evicted = pol.touch, pol.victim, pol.evicted
        for e in initial:
            touch(e)
        resident = set(initial)
        stats = LayerStats()
        staging = prefetch and (layer > 0 or prefetch_first_layer)
        for row in rows:
            for i, e in enumerate(row):
                if e in resident:
                    stats.hits += 1
                else:
                    if staging:
                        stats.prefetch_hits += 1
                    else:
                        stats.misses += 1
                    if len(resident) >= k:
                        protected = row if protect_used else row[i + 1:]
                        candidates = sorted(x for x in resident if x not in protected)
                        if not candidates:  # k < top_k: fall back to protecting only what is still to come
                            candidates = sorted(x for x in resident if x not in row[i + 1:])
                        if not candidates:  # every resident is still needed: the engine uses e in place, once
                            touch(e)
                            continue
                        v = choose(candidates)
                        if v not in candidates:
                            raise RuntimeError(f"policy {pname!r} chose {v}, not among candidates {candidates}")
                        resident.discard(v)
                        evicted(v)
                        stats.evictions += 1
                    resident.add(e)
                touch(e)
        layers.append(stats)
    return ReplayResult(pname, k, bool(prefetch), layers, n_tokens, (name,) if name else ())


def replay_many(traces: TraceSource, k: int, policy: PolicySpec = "lru", **options) -> ReplayResult:
    """Replay every problem of ``traces`` (each starting afresh) and sum the counters layer by layer.

    ``options`` are :func:`replay`'s keywords (``prefetch``, ``prefetch_first_layer``, ``num_experts``, ``warm``,
    ``protect_used``).
    """
    total: Optional[ReplayResult] = None
    for name, trace in _as_traces(traces).items():
        r = replay(trace, k, policy, name=name, **options)
        total = r if total is None else total.merge(r)
    if total is None:
        raise ValueError("no traces to replay")
    return total


@dataclass
class HitRateTable:
    """Aggregated hit rates, keyed by ``(policy, k, prefetch)``."""

    policies: Tuple[str, ...]
    ks: Tuple[int, ...]
    modes: Tuple[bool, ...]
    results: Dict[Tuple[str, int, bool], ReplayResult] = field(default_factory=dict)
    problems: Tuple[str, ...] = ()
    tokens: int = 0

    def rate(self, policy: str, k: int, prefetch: bool = False) -> float:
        return self.results[(policy, k, prefetch)].hit_rate

    def rows(self) -> List[Tuple[str, List[float]]]:
        out = []
        for mode in self.modes:
            for p in self.policies:
                label = p + (" + oracle prefetch" if mode else "")
                out.append((label, [self.rate(p, k, mode) for k in self.ks]))
        return out

    def format(self, markdown: bool = False) -> str:
        head = ["policy"] + [f"k={k}" for k in self.ks]
        body = [[label] + [f"{100 * r:.1f}" for r in rates] for label, rates in self.rows()]
        if markdown:
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * len(self.ks)]
            lines += ["| " + " | ".join(r) + " |" for r in body]
            return "\n".join(lines)
        w0 = max(len(r[0]) for r in [head] + body)
        return "\n".join(r[0].ljust(w0) + "".join(c.rjust(7) for c in r[1:]) for r in [head] + body)


def hit_rate_table(traces: Optional[TraceSource] = None, policies: Optional[Iterable[str]] = None,
                   ks: Iterable[int] = range(1, 9), prefetch: Iterable[bool] = (False, True),
                   **options) -> HitRateTable:
    """Hit rate (in [0, 1]) per policy x k x prefetch mode, aggregated over all problems of ``traces``.

    ``traces``: ``{name: array}``, one path, or several paths (npz or profiler JSON); default: the shared npz files.
    ``policies`` default to :data:`~offload_engine.policy.POLICIES` plus ``"belady"``. ``options``: :func:`replay`'s
    keywords other than ``prefetch``.
    """
    if traces is None:
        traces = default_trace_paths()
        if not traces:
            raise FileNotFoundError(f"no traces given and none found in {_shared_routing_dir()}: record a model's "
                                    "routing with `python scripts/profile_cache.py MODEL --out report.json`")
    data = _as_traces(traces)
    pols = tuple(p.strip().lower() for p in (policies if policies is not None else (*POLICIES, BELADY)))
    for p in pols:
        if p != BELADY and p not in POLICIES:
            raise ValueError(f"unknown policy {p!r}; valid names: {', '.join((*POLICIES, BELADY))}")
    table = HitRateTable(pols, tuple(int(k) for k in ks), tuple(bool(m) for m in prefetch),
                         problems=tuple(data), tokens=sum(int(a.shape[0]) for a in data.values()))
    for mode in table.modes:
        for p in pols:
            for k in table.ks:
                table.results[(p, k, mode)] = replay_many(data, k, p, prefetch=mode, **options)
    return table
