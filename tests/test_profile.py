"""Profiling (issue 6): the simulator reproduces the engine's own cache counters, the profiler's report follows its
schema, and the throughput model moves the right way."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import offload_engine
from offload_engine.simulate import replay, routing_from_report

from conftest import exact_config

REPO = Path(__file__).resolve().parents[1]
LAYER_FIELDS = {"lookups", "hits", "misses", "evictions", "prefetch_issued", "prefetch_used", "prefetch_wasted",
                "guessed", "guessed_correct", "needed_after_guess", "bytes_h2d", "bytes_d2h", "wait_s", "cpu_computed",
                "cpu_ms", "hit_rate", "prefetch_precision", "prefetch_recall"}


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
           "--out", str(out), "--trace", str(tmp_path / "routing.npz"), "--guess-distances", "1", "2", "--quiet"]
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
    assert timing["host_ms_per_layer"] > 0 and "cpu" in timing["host_timing"]
    assert set(report["costs"]) == {"expert_bytes", "expert_kernel_bytes", "expert_kernel_bytes_per_token",
                                    "trunk_bytes_per_layer", "kv_bytes_per_layer", "head_bytes"}
    assert report["costs"]["expert_bytes"] > 0
    quality = report["guess_distances"]
    assert set(quality) == {"1", "2"} and all(0 <= q["precision"] <= 1 for d in quality.values() for q in d.values())
    assert quality["1"]["1"]["guesses"] == 2 * 5 * 2 and quality["2"]["1"]["guesses"] == 2 * 5 * 1  # 3 layers
    assert f"report: {out}" in done.stdout, "the path as given"
    with np.load(tmp_path / "routing.npz") as npz:
        assert np.array_equal(npz["routing_experts"], routing_from_report(report))

    # The report is a trace a user replays in a plain clone (no ../shared): through the policies and the engine.
    clone = plain_clone(tmp_path)
    simulated = run_script(clone, "simulate_cache.py", str(out), "--k", "1-2")
    assert simulated.returncode == 0 and "lru" in simulated.stdout, simulated.stderr[-2000:]
    modelled = run_script(clone, "throughput_model.py", str(out), "--batch", "1", "2")
    assert modelled.returncode == 0, modelled.stderr[-2000:]
    assert "profiler report" in modelled.stdout and "aggregate tok/s" in modelled.stdout
    assert "| Tesla T4 16 GB (Colab) | 2 | yes | none |" in modelled.stdout


# ---- the scripts in a plain clone (issue 19 item 9): a user's own traces, no ../shared ----
def plain_clone(tmp_path: Path) -> Path:
    """The package and scripts copied where no ../shared exists (the demo model left out: not needed)."""
    clone = tmp_path / "work" / "offload_engine_clone"
    ignore = shutil.ignore_patterns("__pycache__", "demo", "*.so")
    shutil.copytree(REPO / "offload_engine", clone / "offload_engine", ignore=ignore)
    shutil.copytree(REPO / "scripts", clone / "scripts", ignore=ignore)
    assert not (clone.parent / "shared").exists()
    return clone


def run_script(clone: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(clone)}
    return subprocess.run([sys.executable, str(clone / "scripts" / name), *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=clone)


def test_profiler_reports_misses_computed_on_the_cpu(tmp_path, tiny_dir):
    """--cpu-compute always (hybrid execution, issue 23): each layer's CPU-computed misses and their time."""
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(REPO / "scripts/profile_cache.py"), str(tiny_dir), "--config", "cpu",
           "--experts-on-device", "2", "--prefetch", "0", "--cpu-compute", "always", "--max-new-tokens", "4",
           "--num-random-prompts", "1", "--prompt-tokens", "4", "--threads", "1", "--out", str(out), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    overall = report["overall"]
    assert report["cpu_compute"] == "always" and report["config"]["offload"]["cpu_compute"] == "always"
    assert overall["cpu_computed"] == overall["misses"] > 0 and overall["bytes_h2d"] == 0
    assert sum(s["cpu_computed"] for s in report["per_layer"]) == overall["cpu_computed"]
    assert overall["cpu_ms"] > 0
    assert f"cpu_compute always: {overall['cpu_computed']} missed experts computed on the CPU" in done.stdout
    assert "on cpu" in done.stdout


def test_scripts_in_a_plain_clone_say_what_to_pass(tmp_path):
    clone = plain_clone(tmp_path)
    for name in ("simulate_cache.py", "throughput_model.py"):
        done = run_script(clone, name)
        assert done.returncode == 2, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "profile_cache.py MODEL --out report.json" in lines[0]


def test_throughput_model_replays_npz_traces_in_a_plain_clone(tmp_path):
    clone = plain_clone(tmp_path)
    rng = np.random.default_rng(0)
    trace = np.stack([[rng.choice(8, 2, replace=False) for _ in range(32)] for _ in range(12)])  # [12, 32, 2]
    np.savez(tmp_path / "mine.npz", mine_p0_experts=trace)
    done = run_script(clone, "throughput_model.py", str(tmp_path / "mine.npz"), "--sensitivity", "--batch", "1", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for fragment in ("modelled (timed replay of the engine's cache)", "Tesla T4 16 GB", "Kaggle T4 VM (29 GB)",
                     "PCIe 6 GB/s each way", "host 1.5 ms/layer", "Guess precision", "aggregate tok/s", "12 decode"):
        assert fragment in out, fragment
    t4_rows = [line for line in out.splitlines() if line.startswith("| Tesla T4 16 GB (Colab), Colab")]
    assert len(t4_rows) == 3 and all("| 5 | yes |" in row for row in t4_rows)
    kaggle = [line for line in out.splitlines() if line.startswith("| Tesla T4 16 GB (Colab), Kaggle")]
    assert kaggle and all("| 5 | no |" in row and "| 0.00 |" in row for row in kaggle)
