"""Profiling (issue 6): the simulator reproduces the engine's own cache counters, the profiler's report follows its
schema, and the throughput model moves the right way."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import offload_engine
from offload_engine.simulate import replay, routing_from_report
from offload_engine.throughput import NO_PREFETCH, ORACLE, Prefetch, estimate

from conftest import exact_config

REPO = Path(__file__).resolve().parents[1]
LAYER_FIELDS = {"lookups", "hits", "misses", "evictions", "prefetch_issued", "prefetch_used", "prefetch_wasted",
                "guessed", "guessed_correct", "needed_after_guess", "bytes_h2d", "bytes_d2h", "wait_s", "hit_rate",
                "prefetch_precision", "prefetch_recall"}


def _decode_with_routing(engine, prompt: list[int], steps: int) -> np.ndarray:
    """Greedy decode, recording each forward pass's lookups as one trace row per layer: the distinct experts in order
    of first use, which is the order the engine looks them up in (for a prefill, over all prompt tokens). Stats are
    reset after the prefill, so the engine's counters cover the decode steps only. Returns [1 + steps, layers, 8]
    (row 0: the prefill; -1 pads)."""
    n_layers, n_experts = len(engine.model.layers), engine.model.config.num_local_experts
    kv_cache = DynamicCache(config=engine.model.config)
    trace = []

    def forward(ids: list[int]) -> torch.Tensor:
        rows = np.full((n_layers, n_experts), -1)

        def on_routing(layer: int, experts_per_token: list[list[int]], guess: list[int]) -> None:
            order = list(dict.fromkeys(e for token in experts_per_token for e in token))
            rows[layer, : len(order)] = order

        logits = engine.model(torch.tensor([ids]), kv_cache, on_routing=on_routing)
        trace.append(rows)
        return logits[0, -1]

    logits = forward(prompt)
    engine.reset_stats()
    for _ in range(steps):
        logits = forward([int(logits.argmax())])
    return np.stack(trace)


@pytest.mark.parametrize("k,policy", [(1, "lru"), (2, "lru"), (3, "lru"), (5, "lru"), (3, "lrfu")])
def test_simulator_counts_equal_engine_counters(tiny_dir, k, policy, one_thread):
    engine = offload_engine.load(tiny_dir, config=exact_config(experts_on_device=k, prefetch=0, policy=policy),
                                 progress=False)
    # The prefill (12 tokens: most experts, looked up once each) is replayed as one row so that the simulator reaches
    # the engine's cache state; the decode counts are then the full replay minus the prefill's.
    prompt = torch.randint(0, 160, (12,), generator=torch.Generator().manual_seed(k)).tolist()
    trace = _decode_with_routing(engine, prompt, steps=96)
    assert (trace[0] >= 0).sum(axis=1).min() > 2, "the prefill should look up more experts than a decode step"
    options = dict(warm=True, protect_used=False, num_experts=8)
    full, before = replay(trace, k, policy, **options), replay(trace[:1], k, policy, **options)
    engine_layers = engine.stats()["per_layer"]
    assert len(engine_layers) == len(full.layers) == 3
    for layer, (got, whole, pre) in enumerate(zip(engine_layers, full.layers, before.layers)):
        simulated = {"hits": whole.hits - pre.hits, "misses": whole.misses - pre.misses,
                     "evictions": whole.evictions - pre.evictions}
        assert {key: got[key] for key in simulated} == simulated, f"layer {layer}"
        assert got["lookups"] == 2 * (len(trace) - 1)  # top-2, distinct experts
    overall = engine.stats()["overall"]
    assert 0 < overall["misses"] < overall["lookups"], "the trace must exercise both hits and misses"


def test_profiler_end_to_end_report_follows_schema(tmp_path, tiny_dir):
    out = tmp_path / "report.json"
    # The packaged CPU config (bfloat16, 2-bit experts, 4-bit attention) with offloading and prefetch switched on.
    cmd = [sys.executable, str(REPO / "scripts/profile_cache.py"), str(tiny_dir), "--config", "cpu",
           "--experts-on-device", "2", "--prefetch", "1",
           "--max-new-tokens", "6", "--num-random-prompts", "2", "--prompt-tokens", "5", "--threads", "1",
           "--out", str(out), "--quiet"]
    plot = None
    try:
        import matplotlib  # noqa: F401

        plot = tmp_path / "hits.png"
        cmd += ["--plot", str(plot)]
    except ImportError:
        pass
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    for fragment in ("$ python scripts/profile_cache.py", "machine:", "hit %", "precision", "tokens/s", "compute",
                     "copies", "other"):
        assert fragment in done.stdout, fragment

    report = json.loads(out.read_text())
    # The precision is printed with its parts, the report's counters (one definition: offload_engine/cache_stats.py).
    overall = report["overall"]
    printed = re.search(r"all layers: prefetch precision ([\d.]+)% \((\d+) of (\d+) guesses used\)", done.stdout)
    assert printed, done.stdout
    assert (int(printed[2]), int(printed[3])) == (overall["guessed_correct"], overall["guessed"])
    assert float(printed[1]) == round(100 * overall["prefetch_precision"], 1)
    for key in ("schema_version", "model", "command", "config", "machine", "prompts", "tokens", "routing", "guesses",
                "per_layer", "overall", "prefill", "timing", "num_layers", "num_experts", "top_k"):
        assert key in report, key
    assert report["schema_version"] == 1 and report["num_layers"] == 3 and report["top_k"] == 2
    n = report["tokens"]
    assert n == len(report["routing"]) == len(report["guesses"]) == 2 * 5  # 6 tokens each = 5 decode steps
    assert all(len(step) == 3 and all(len(layer) == 2 for layer in step) for step in report["routing"])
    assert all(len(step) == 3 and all(len(layer) == 1 for layer in step) for step in report["guesses"])
    assert [p["first_step"] for p in report["prompts"]] == [0, 5]
    assert all(len(p["prompt_ids"]) == 5 and len(p["generated_ids"]) == 6 for p in report["prompts"])
    assert len(report["per_layer"]) == 3 and all(set(s) == LAYER_FIELDS for s in report["per_layer"])
    overall = report["overall"]
    assert overall["lookups"] == sum(s["lookups"] for s in report["per_layer"]) == 2 * 3 * n
    assert overall["hits"] + overall["misses"] == overall["lookups"]
    assert overall["guessed"] == 3 * n  # one guess per layer per step
    for layer, stats in enumerate(report["per_layer"]):  # each guess is recorded against the layer it was made for
        correct = sum(len(set(g[layer]) & set(r[layer])) for g, r in zip(report["guesses"], report["routing"]))
        assert correct == stats["guessed_correct"], layer
    assert report["config"]["offload"]["experts_on_device"] == 2
    timing = report["timing"]
    assert timing["decode_steps"] == n and len(timing["step_forward_ms"]) == n
    assert set(timing["per_token_ms"]) == {"total", "compute", "copies", "experts", "other"}
    assert timing["per_token_ms"]["copies"] is not None  # CPU: the cache's copies are timed
    assert routing_from_report(report).shape == (n, 3, 2)
    if plot is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- throughput model ----
EXPERT = 66_404_400  # bytes, Mixtral 2-bit g16
T4 = dict(h2d=11.5e9, d2h=11.5e9)


def _rate(compute_s=0.5, hit=0.6, k=4, bandwidth=11.5e9, writeback=True, prefetch=NO_PREFETCH) -> float:
    return estimate(compute_s, EXPERT, bandwidth, bandwidth, hit, k, writeback=writeback,
                    prefetch=prefetch).tokens_per_s


@pytest.mark.parametrize("compute_s", [0.02, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("prefetch", [NO_PREFETCH, Prefetch(1, 0.8), Prefetch(2, 0.5), ORACLE])
def test_throughput_is_monotonic_in_bandwidth_and_hit_rate(compute_s, prefetch):
    hits = np.linspace(0.0, 1.0, 21)
    by_hit = [_rate(compute_s, h, prefetch=prefetch) for h in hits]
    assert all(b >= a - 1e-12 for a, b in zip(by_hit, by_hit[1:]))
    by_bw = [_rate(compute_s, 0.6, bandwidth=bw * 1e9, prefetch=prefetch) for bw in (2, 4, 8, 11.5, 16, 24, 64)]
    assert all(b >= a - 1e-12 for a, b in zip(by_bw, by_bw[1:]))
    # Write-backs on a second stream (the other PCIe direction) never slow a token down.
    duplex = estimate(compute_s, EXPERT, hit_rate=0.6, k=4, prefetch=prefetch, duplex=True, **T4).token_s
    assert duplex <= estimate(compute_s, EXPERT, hit_rate=0.6, k=4, prefetch=prefetch, **T4).token_s
    # All 8 experts resident: compute-bound (with k < 8 wrong guesses still copy, even at a 100 % hit rate).
    assert _rate(compute_s, 1.0, k=8, prefetch=prefetch) == pytest.approx(1.0 / compute_s)


def test_naive_below_lru_below_lru_with_prefetch():
    # Reference-like settings: a T4, k=4 at ~60 % LRU hits, compute that copies can hide behind, good guesses.
    naive = _rate(0.5, 0.0, writeback=False)
    lru = _rate(0.5, 0.6)
    guessed = _rate(0.5, 0.6, prefetch=Prefetch(1, 0.8))
    oracle = _rate(0.5, 0.6, prefetch=ORACLE)
    assert naive < lru < guessed < oracle <= 1 / 0.5
    # Perfect guesses never hurt; imperfect ones can when the copy stream, not compute, is the bottleneck.
    for c in (0.02, 0.2, 1.0):
        assert _rate(c, 0.6, prefetch=Prefetch(1, 1.0)) >= _rate(c, 0.6)
    assert _rate(0.02, 0.6, prefetch=Prefetch(1, 0.5)) < _rate(0.02, 0.6)
    # Naive copies every expert once per token and overlaps nothing.
    e = estimate(0.5, EXPERT, hit_rate=0.0, k=4, writeback=False, **T4)
    assert e.misses == 64 and e.token_s == pytest.approx(0.5 + 64 * EXPERT / 11.5e9)
