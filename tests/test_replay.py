"""The timed replay of the real expert cache (issue 20): stand-in streams with durations, the copy-in/write-back
chain of the old slot choice and the overlap of the new one, write-back modes, the prefetch gate, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offload_engine.expert_cache import ExpertCache
from offload_engine.replay import ModelCosts, Speeds, replay_engine
from offload_engine.stream_check import TimedStreams

# A Mixtral-like layer: 66 MB experts (5.8 ms at 11.5 GB/s), 0.28 ms of kernels per expert at 240 GB/s.
COSTS = ModelCosts(expert_bytes=66_404_400, expert_kernel_bytes=66_723_888, expert_kernel_bytes_per_token=319_488,
                   trunk_bytes_per_layer=22_634_560, kv_bytes_per_layer=2_097_152, head_bytes=262_144_000)


def routing(tokens: int = 120, layers: int = 6, experts: int = 8, seed: int = 0) -> dict:
    """Random top-2 routing with some locality: each layer prefers a few experts, as real routing does."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(experts, 0.6), size=layers)  # [layers, experts]
    trace = np.stack([[rng.choice(experts, 2, replace=False, p=weights[l]) for l in range(layers)]
                      for _ in range(tokens)])
    return {"synthetic": trace}  # [tokens, layers, 2]


def chained_pairs(ops) -> list:
    """(write-back of a miss, the copy-in queued right after it in the same layer call): the second miss."""
    pairs = []
    for i, op in enumerate(ops):
        if op.kind == "copy" and op.timeline == "d2h":
            nxt = next((o for o in ops[i + 1 :] if o.kind == "copy" and o.timeline == "h2d"), None)
            if nxt is not None and nxt.issued == op.issued:
                pairs.append((op, nxt))
    return pairs


def test_old_slot_choice_chains_copy_ins_behind_write_backs(monkeypatch):
    """Today's slot choice before issue 20 (`free_slots.pop()`: the slot freed last) puts a second miss's copy-in
    behind the first miss's write-back, which waits for the first copy-in: the two streams take turns."""
    monkeypatch.setattr(ExpertCache, "_take_free_slot", lambda self: self.free_slots.pop())
    result = replay_engine(routing(), COSTS, k=3, prefetch=0, keep_ops=True)
    pairs = chained_pairs(sorted(result.streams.ops, key=lambda op: op.seq))
    assert len(pairs) > 20
    assert all(copy_in.start >= write_back.end for write_back, copy_in in pairs)
    assert result.both_copying_s == 0.0, "the chain never lets both directions copy at once"


def test_copy_ins_overlap_write_backs():
    """The slot freed longest ago: a second miss's copy-in starts while the first miss's write-back runs."""
    result = replay_engine(routing(), COSTS, k=3, prefetch=0, keep_ops=True)
    pairs = chained_pairs(sorted(result.streams.ops, key=lambda op: op.seq))
    assert len(pairs) > 20
    late = [(w.label, c.label) for w, c in pairs if c.start >= w.end]
    assert not late, f"copy-ins waited for the previous miss's write-back: {late[:3]}"
    assert result.both_copying_s > 0.5 * result.busy_s["d2h"]
    assert result.races == 0


def test_overlap_is_faster_and_no_write_backs_leave_the_link_to_copy_ins(monkeypatch):
    trace = routing()
    swap = replay_engine(trace, COSTS, k=3, prefetch=0)
    never = replay_engine(trace, COSTS, k=3, prefetch=0, write_back=False)
    assert never.write_backs_per_token == 0 and never.busy_s["d2h"] == 0
    assert never.copies_per_token == swap.copies_per_token == swap.write_backs_per_token
    # Full duplex: write-backs overlap, so swapping costs (almost) nothing over no write-backs ...
    assert swap.tokens_per_s >= 0.97 * never.tokens_per_s
    # ... but where both directions share one link, dropping the write-backs is what keeps copy-ins fast.
    shared = Speeds(duplex_gbps=11.5)
    assert (replay_engine(trace, COSTS, shared, k=3, prefetch=0, write_back=False).tokens_per_s
            > 1.5 * replay_engine(trace, COSTS, shared, k=3, prefetch=0).tokens_per_s)
    monkeypatch.setattr(ExpertCache, "_take_free_slot", lambda self: self.free_slots.pop())
    assert replay_engine(trace, COSTS, k=3, prefetch=0).tokens_per_s < 0.8 * swap.tokens_per_s


def test_critical_path_adds_up_and_busy_times_are_bounded():
    result = replay_engine(routing(tokens=60), COSTS, Speeds(host_ms_per_layer=1.0), k=4, prefetch=1)
    assert sum(result.critical_s.values()) == pytest.approx(result.seconds, rel=1e-9)
    assert all(0 < result.busy_s[name] <= result.seconds * (1 + 1e-9) for name in ("host", "compute", "h2d"))
    assert result.busy_s["host"] == pytest.approx(60 * 6 * 1e-3)  # host ms per layer x layers x tokens
    again = replay_engine(routing(tokens=60), COSTS, Speeds(host_ms_per_layer=1.0), k=4, prefetch=1)
    assert again.seconds == result.seconds, "the replay is deterministic"


def test_faster_links_and_hosts_never_slow_the_replay():
    trace = routing(tokens=60)
    rates = [replay_engine(trace, COSTS, Speeds(h2d_gbps=bw, d2h_gbps=bw), k=3, prefetch=0).tokens_per_s
             for bw in (3, 6, 11.5, 24)]
    assert rates == sorted(rates)
    hosts = [replay_engine(trace, COSTS, Speeds(host_ms_per_layer=ms), k=3, prefetch=0).tokens_per_s
             for ms in (2.0, 1.0, 0.5, 0.0)]
    assert hosts == sorted(hosts)


@pytest.mark.parametrize("precision", [0.3, 0.6, 0.8])
def test_the_prefetch_gate_keeps_bad_guesses_from_costing(precision):
    trace = routing()
    off = replay_engine(trace, COSTS, Speeds(precision=precision), k=3, prefetch=0)
    ungated = replay_engine(trace, COSTS, Speeds(precision=precision), k=3, prefetch=1)
    gated = replay_engine(trace, COSTS, Speeds(precision=precision), k=3, prefetch=1, min_precision=0.97)
    assert ungated.tokens_per_s < off.tokens_per_s, "wrong guesses take the link from demand copies"
    assert gated.stats["prefetch_issued"] == 0 and gated.stats["guessed"] > 0
    assert gated.tokens_per_s >= off.tokens_per_s


def test_perfect_guesses_pay():
    trace = routing()
    off = replay_engine(trace, COSTS, Speeds(precision=1.0), k=3, prefetch=0)
    on = replay_engine(trace, COSTS, Speeds(precision=1.0), k=3, prefetch=1, min_precision=0.97)
    assert on.stats["prefetch_used"] > 0 and on.tokens_per_s > off.tokens_per_s


def test_batches_share_copies():
    trace = routing(tokens=240)
    results = [replay_engine(trace, COSTS, k=3, prefetch=0, batch=b) for b in (1, 2, 4, 8)]
    assert [r.tokens for r in results] == [240, 240, 240, 240]
    copies = [r.copies_per_token for r in results]
    assert copies == sorted(copies, reverse=True) and copies[-1] < 0.6 * copies[0]
    assert [r.tokens_per_s for r in results] == sorted(r.tokens_per_s for r in results)
    with pytest.raises(ValueError, match="batch"):
        replay_engine(trace, COSTS, k=3, batch=241)


@pytest.mark.parametrize("duplex,expected_ms", [(None, 1.0), (1e9, 2.0)])
def test_timed_streams_share_the_link_when_both_directions_copy(duplex, expected_ms):
    streams = TimedStreams(h2d=1e9, d2h=1e9, copy_bytes=1_000_000, duplex=duplex, keep_ops=True)
    a, b = torch.zeros(1), torch.ones(1)
    streams.copy(a, b, streams.h2d, ("slot", 0), ("host", 0, 0))  # 1 ms alone
    streams.copy(b, a, streams.d2h, ("host", 0, 1), ("slot", 1))
    streams.synchronize()
    assert streams.host_now == pytest.approx(expected_ms / 1e3)
    streams.kernel(0.5e-3)
    event = streams.record(streams.compute)
    streams.wait(streams.h2d, event)  # the next copy-in waits for the kernel
    streams.copy(a, b, streams.h2d, ("slot", 0), ("host", 0, 2))
    streams.host_work(0.2e-3)
    streams.synchronize()
    copy_in = [op for op in streams.ops if op.kind == "copy" and op.timeline == "h2d"][-1]
    assert copy_in.start == pytest.approx(expected_ms / 1e3 + 0.5e-3)
    assert copy_in.bound_by.label == "wait for kernel"
    assert sum(streams.critical_path().values()) == pytest.approx(streams.host_now)
