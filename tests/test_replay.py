"""The timed replay of the real expert cache (issue 20): stand-in streams with durations, the copy-in/write-back
chain of the old slot choice and the overlap of the new one, write-back modes, the prefetch gate, batches; and its
CPU tier (issue 23): a miss computed on the CPU, timed by hand, `off` as copy-only, `auto` never losing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from offload_engine.expert_cache import ExpertCache
from offload_engine.replay import CpuSpeeds, ModelCosts, Speeds, replay_engine
from offload_engine.stream_check import TimedStreams
from offload_engine.throughput import CPUS, GPUS, cpu_tier, speeds_of

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


# ---- the CPU tier (issue 23) ----
# One layer, k = 1 (expert 0 resident), one token routed to experts 0 and 3: expert 3 is the one miss. No trunk,
# KV or lm_head, so the step is: 0.5 ms of host work, the routing read, then the layer, then the sampler's read.
ONE_LAYER = {"one token": np.array([[[0, 3]]])}  # [tokens, layers, top_k]
BARE = ModelCosts(expert_bytes=11_500_000, expert_kernel_bytes=24_000_000, expert_kernel_bytes_per_token=0,
                  trunk_bytes_per_layer=0, kv_bytes_per_layer=0, head_bytes=0)  # a copy: 1 ms; kernels: 0.1 ms


def one_layer(cpu: CpuSpeeds | None, **options):
    return replay_engine(ONE_LAYER, BARE, Speeds(kernel_gbps=240.0), k=1, prefetch=0, keep_ops=True, cpu=cpu, **options)


def test_a_miss_the_cpu_computes_costs_its_kernel_and_round_trip_not_the_copy():
    off = one_layer(None)
    assert off.seconds == pytest.approx((0.5 + 1.0 + 0.1) * 1e-3)  # host, copy of expert 3, its kernels
    assert off.copies_per_token == 1 and off.stats["cpu_computed"] == 0
    tier = CpuSpeeds(expert_ms=((1, 0.2), (2, 0.3)), round_trip_ms=0.05, call_host_ms=0.02, mode="auto")
    hybrid = one_layer(tier)
    assert hybrid.stats["cpu_computed"] == hybrid.stats["misses"] == 1 and hybrid.copies_per_token == 0
    # host 0.5, then the CPU (0.2 + a 0.05 round trip) beside expert 0's 0.1 ms on the device: the CPU ends last
    assert hybrid.seconds == pytest.approx((0.5 + 0.2 + 0.05) * 1e-3)
    assert hybrid.busy_s["cpu"] == pytest.approx(0.25e-3) and hybrid.busy_s["h2d"] == 0
    assert hybrid.critical_s["cpu"] == pytest.approx(0.25e-3)
    assert sum(hybrid.critical_s.values()) == pytest.approx(hybrid.seconds)
    # Oversubscribed (the kernel takes every core): the host's 0.02 ms hand-over preempts a kernel thread.
    crowded = one_layer(CpuSpeeds(expert_ms=((1, 0.2),), round_trip_ms=0.05, call_host_ms=0.02, oversubscribed=True))
    assert crowded.seconds == pytest.approx((0.5 + 0.2 + 0.05 + 0.02) * 1e-3)
    # Faster than the copy path (1.1 ms) but not once the host's 0.5 ms join is counted: auto copies.
    assert one_layer(CpuSpeeds(expert_ms=((1, 0.6),), round_trip_ms=0.05, call_host_ms=0.02)).seconds == off.seconds
    # A CPU slower than the copy and its kernels: auto copies, as off does; always pays the CPU.
    slow = CpuSpeeds(expert_ms=((1, 1.5),), round_trip_ms=0.05, call_host_ms=0.02, mode="auto")
    assert one_layer(slow).seconds == off.seconds
    always = one_layer(CpuSpeeds(expert_ms=((1, 1.5),), round_trip_ms=0.05, call_host_ms=0.02, mode="always"))
    assert always.seconds == pytest.approx((0.5 + 1.5 + 0.05) * 1e-3)


def test_the_cpu_tier_copies_and_evicts_nothing():
    """Every miss computed on the CPU, as the engine counts it: a lookup and a miss, no copy, no eviction."""
    trace = routing(tokens=40)
    always = replay_engine(trace, COSTS, k=3, prefetch=0, cpu=CpuSpeeds(((1, 1.0),), mode="always"))
    assert always.stats["evictions"] == 0 and always.copies_per_token == 0 and always.write_backs_per_token == 0
    assert always.stats["misses"] == always.stats["cpu_computed"] > 0
    assert always.stats["hits"] + always.stats["cpu_computed"] == always.stats["lookups"]
    assert always.stats["lookups"] == sum((t >= 0).sum() for t in trace.values())  # one token per step
    assert always.races == 0
    # Swapping (write-backs into host slots) with some misses on the CPU: the CPU's reads ordered after them.
    mixed = replay_engine(trace, COSTS, speeds_of(GPUS["rtx3060"]), k=3, prefetch=1, write_back=True,
                          cpu=cpu_tier(CPUS["desktop8"], "auto"))
    assert mixed.races == 0 and mixed.stats["cpu_computed"] > 0 and mixed.write_backs_per_token > 0


@pytest.mark.parametrize("write_back,prefetch", [(True, 0), (True, 1), (False, 1)])
def test_off_is_the_copy_only_replay_exactly(write_back, prefetch):
    trace = routing(tokens=60)
    options = dict(k=3, prefetch=prefetch, write_back=write_back)
    off = replay_engine(trace, COSTS, cpu=CpuSpeeds(((1, 0.1),), mode="off"), **options)
    plain = replay_engine(trace, COSTS, **options)
    assert off.seconds == plain.seconds and off.stats == plain.stats and off.stats["cpu_computed"] == 0
    assert off.busy_s["cpu"] == 0 and all(off.busy_s[name] == plain.busy_s[name] for name in plain.busy_s)


@pytest.mark.parametrize("gpu", ["t4", "rtx3060"])
def test_auto_never_loses_to_copy_only_on_the_profiles(gpu):
    trace = routing(tokens=60)
    for name, cpu in CPUS.items():
        speeds = speeds_of(GPUS[gpu], host_ms_per_layer=cpu.host_ms_per_layer)
        copy_only = replay_engine(trace, COSTS, speeds, k=3, prefetch=0)
        auto = replay_engine(trace, COSTS, speeds, k=3, prefetch=0, cpu=cpu_tier(cpu, "auto"))
        always = replay_engine(trace, COSTS, speeds, k=3, prefetch=0, cpu=cpu_tier(cpu, "always"))
        assert auto.tokens_per_s >= copy_only.tokens_per_s, name
        assert auto.tokens_per_s >= always.tokens_per_s * (1 - 1e-9), name
    # A fast desktop CPU beside a PCIe 4.0 link wins; Colab's 2 vCPUs computing every miss lose badly.
    desktop = cpu_tier(CPUS["desktop8"], "auto")
    speeds = speeds_of(GPUS[gpu], host_ms_per_layer=CPUS["desktop8"].host_ms_per_layer)
    assert (replay_engine(trace, COSTS, speeds, k=3, prefetch=0, cpu=desktop).tokens_per_s
            > 1.2 * replay_engine(trace, COSTS, speeds, k=3, prefetch=0).tokens_per_s)
    colab = speeds_of(GPUS[gpu], host_ms_per_layer=CPUS["colab"].host_ms_per_layer)
    assert (replay_engine(trace, COSTS, colab, k=3, prefetch=0, cpu=cpu_tier(CPUS["colab"], "always")).tokens_per_s
            < 0.5 * replay_engine(trace, COSTS, colab, k=3, prefetch=0).tokens_per_s)


def test_cpu_profiles_scale_the_measured_kernel():
    desktop, ddr5 = CPUS["desktop8"].expert_ms(), CPUS["ddr5-16"].expert_ms()
    assert [t for t, _ in desktop] == [1, 2, 3, 4]
    assert desktop[0][1] == pytest.approx(1e3 * 66_404_400 / 40e9)  # bandwidth-bound: bytes over 40 GB/s
    assert [ms for _, ms in desktop] == sorted(ms for _, ms in desktop)
    assert all(ms >= 1e3 * 66_404_400 / 64e9 - 1e-9 for _, ms in ddr5)
    assert CPUS["colab"].expert_ms()[0][1] > 3 * desktop[0][1]
    assert CPUS["desktop8"].expert_ms(33_202_200)[0][1] == pytest.approx(desktop[0][1] / 2)
    with pytest.raises(ValueError, match="cpu_compute"):
        CpuSpeeds(((1, 1.0),), mode="sometimes")


def test_throughput_model_hybrid_runs_as_a_user_runs_it(tmp_path):
    """`python scripts/throughput_model.py TRACE --hybrid` in a plain copy of the scripts (no ../shared)."""
    repo = Path(__file__).resolve().parents[1]
    clone = tmp_path / "work" / "clone"
    ignore = shutil.ignore_patterns("__pycache__", "demo", "*.so")
    for part in ("offload_engine", "scripts"):
        shutil.copytree(repo / part, clone / part, ignore=ignore)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", mine_p0_experts=np.stack(
        [[rng.choice(8, 2, replace=False) for _ in range(32)] for _ in range(10)]))  # [10, 32, 2]
    done = subprocess.run([sys.executable, str(clone / "scripts" / "throughput_model.py"), str(tmp_path / "mine.npz"),
                           "--hybrid"], capture_output=True, text=True, cwd=clone, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(clone)})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for fragment in ("modelled (timed replay of the engine's cache with a CPU timeline)", "CPU kernel measured here",
                     "float16", "round trip 0.1 ms", "Hybrid sensitivity", "PCIe gen3"):
        assert fragment in out, fragment
    hybrid = [r for r in (line.split(" | ") for line in out.splitlines() if line.startswith(("| Tesla", "| RTX")))
              if len(r) == 11]
    assert len(hybrid) == 2 * len(CPUS)
    for row in hybrid:  # copy-only <= auto, each with the CPU's own host ms and a CPU ms per expert
        copy_only, auto = float(row[7]), float(row[8].strip("*").split()[0])
        assert auto >= copy_only, row
