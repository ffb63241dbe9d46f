"""Hybrid execution (issue 23): a missed expert computed on the CPU from its host slot, on the CPU worker thread,
gives the copy-only engine's logits (float32, within 1e-4) and greedy tokens, for every family's tiny checkpoint;
`cpu_compute: always` on a CPU device runs the real path (the cache's device and host slots are both host memory,
every miss goes through the worker thread), `auto` with injected costs mixes CPU and copied misses."""

from __future__ import annotations

import threading

import pytest
import torch

import offload_engine
import offload_engine.hybrid as hybrid_module
from offload_engine.config import ConfigError, load_config
from offload_engine.placement import PlacementCosts
from offload_engine.server.metrics import Metrics

from families_cases import CONFIGS, family_config, make_family_checkpoint, num_experts

TYPES = sorted(CONFIGS)
EXACT = {"dtype": "float32", "quant": {p: {"bits": None} for p in ("attention", "experts", "trunk")}}
IDS = torch.randint(0, 160, (1, 9), generator=torch.Generator().manual_seed(3))
PROMPT = [5, 3, 8, 1, 4]
# Decode: the first miss (most tokens first) finishes earlier on the CPU (0.2 + 0.5 ms < 1 + 0.1 ms), the second
# on the device (0.7 + 0.5 > 1.1); a prefill's many tokens go to the device.
MIXED = PlacementCosts(copy_ms=1.0, device_ms=0.1, cpu_ms=((1, 0.5), (8, 4.0)), round_trip_ms=0.2)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest


def load(path, mode: str, k: int, prefetch: int, base: dict = EXACT, **offload):
    config = {**base, "offload": {"experts_on_device": k, "prefetch": prefetch, "cpu_compute": mode, **offload}}
    return offload_engine.load(path, config=config, progress=False)


def mixed(engine):
    """`auto` with costs given instead of measured (on a CPU device auto has nothing to measure)."""
    engine.model.cpu_tier.costs = MIXED
    return engine


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid_families")
    return {t: make_family_checkpoint(root / t, t) for t in TYPES}


@pytest.mark.parametrize("model_type", TYPES)
def test_cpu_computed_misses_equal_the_copy_only_engine(family_dirs, model_type):
    path = family_dirs[model_type]
    E, K = num_experts(model_type), family_config(model_type).num_experts_per_tok
    reference = load(path, "off", 1, 0)
    expected_logits = reference.logits(IDS)
    expected_tokens = reference.generate_ids(PROMPT, max_new_tokens=6)
    computed = 0
    for k in (1, K, E):
        for prefetch in (0, 1):
            for mode in ("always", "auto"):
                engine = load(path, mode, k, prefetch)
                if mode == "auto":
                    mixed(engine)
                where = f"{model_type} k={k} prefetch={prefetch} {mode}"
                assert (engine.logits(IDS) - expected_logits).abs().max().item() < 1e-4, where
                assert engine.generate_ids(PROMPT, max_new_tokens=6) == expected_tokens, where
                engine.cache.check_invariant()
                o = engine.stats()["overall"]
                if k == E:
                    assert o["cpu_computed"] == o["misses"] == 0, where
                elif mode == "always":
                    assert o["cpu_computed"] == o["misses"] > 0, where  # (a staged guess is a hit)
                    assert o["bytes_h2d"] == o["prefetch_issued"] * engine.cache.nbytes, where  # guesses only
                else:  # mixed: some misses on the CPU, some copied
                    assert 0 < o["cpu_computed"] < o["misses"], where
                computed += o["cpu_computed"]
                engine.close()
    assert computed > 0


def test_quantized_experts_on_the_fused_cpu_kernel(tiny_dir):
    """The CPU kernel (fused-cpu where it builds) on 2-bit experts: the same bytes from the host slot."""
    base = {"dtype": "float32", "quant": {"experts": {"bits": 2, "group_size": 16}}}
    reference = load(tiny_dir, "off", 2, 1, base)
    engine = load(tiny_dir, "always", 2, 1, base)
    assert (engine.logits(IDS) - reference.logits(IDS)).abs().max().item() < 1e-4
    assert engine.generate_ids(PROMPT, max_new_tokens=8) == reference.generate_ids(PROMPT, max_new_tokens=8)
    assert engine.model.cpu_kernels is engine.kernels  # CPU device: the device's kernels are the CPU's


def test_cpu_experts_run_on_the_worker_thread_while_the_device_experts_are_queued(tiny_dir, monkeypatch):
    """Overlap: the worker computes a layer's CPU experts while the main thread queues the device's; the main
    thread waits only for their return. Here each CPU job waits until the main thread has run the layer's device
    experts: if the main thread waited for the CPU first, the job would time out."""
    engine = mixed(load(tiny_dir, "auto", 2, 0))
    model, threads, device_ran = engine.model, set(), threading.Event()
    on_cpu, kernels = model._expert_on_cpu, model._run_layer

    def cpu(host_slot, x):
        threads.add(threading.current_thread().name)
        assert device_ran.wait(timeout=10), "the CPU job waited for device experts that were never queued"
        return on_cpu(host_slot, x)

    def run_layer(layer, order, device_kernels, then, cpu_experts, rows, weighted):
        device_ran.clear()
        if len(cpu_experts) == len(order):  # nothing on the device this call
            device_ran.set()

        def marked(expert, buffer):
            device_kernels(expert, buffer)
            device_ran.set()
        return kernels(layer, order, marked, then, cpu_experts, rows, weighted)

    monkeypatch.setattr(model, "_expert_on_cpu", cpu)
    monkeypatch.setattr(model, "_run_layer", run_layer)
    syncs = model.host_syncs
    engine.generate_ids(PROMPT, max_new_tokens=4)
    stats = engine.stats()
    assert threads and threading.current_thread().name not in threads
    calls_with_cpu = sum(s["cpu_computed"] > 0 for s in stats["per_layer"])
    assert calls_with_cpu > 0 and stats["overall"]["cpu_ms"] > 0
    # one routing read per layer call, plus one return of CPU results per layer call that had CPU experts
    assert model.host_syncs - syncs > 5 * len(model.moe_layers)


def test_host_syncs_count_the_return_of_cpu_results(tiny_dir):
    off, always = load(tiny_dir, "off", 1, 0), load(tiny_dir, "always", 1, 0)
    calls = []
    begin = always.cache.begin_layer
    always.cache.begin_layer = lambda layer, order: (calls.append(layer), begin(layer, order))[1]
    off.generate_ids(PROMPT, max_new_tokens=4)
    always.generate_ids(PROMPT, max_new_tokens=4)
    # k=1, top-2: every layer call misses at least once, so each returns CPU results once, one sync more
    assert len(calls) >= 3 * len(always.model.moe_layers)
    assert always.stats()["host_syncs"] - off.stats()["host_syncs"] == len(calls)


def test_auto_on_a_cpu_device_is_moot_and_says_so(tiny_dir):
    engine = load(tiny_dir, "auto", 2, 1)
    engine.generate_ids(PROMPT, max_new_tokens=4)
    stats = engine.stats()
    assert stats["cpu_compute"].startswith("auto (the device is the CPU")
    assert not stats["cpu_compute_active"] and stats["cpu_calibration"] is None
    assert stats["overall"]["cpu_computed"] == 0 and stats["overall"]["misses"] > 0
    assert all(layer["cpu_computed"] == 0 and layer["cpu_ms"] == 0 for layer in stats["per_layer"])
    assert stats["write_back"] in ("always", "never") and stats["prefetch_min_precision"] == 0.0


def test_stats_metrics_and_load_line_report_the_cpu_tier(tiny_dir):
    from offload_engine.cli import stats_report, summary_line

    engine = mixed(load(tiny_dir, "auto", 2, 1, cpu_threads=1, prefetch_min_precision=0.5))
    engine.generate_ids(PROMPT, max_new_tokens=4)
    stats = engine.stats()
    assert stats["cpu_compute_mode"] == "auto" and stats["cpu_compute_active"] and stats["cpu_threads"] == 1
    assert stats["cpu_calibration"] == {"copy_ms": 1.0, "device_ms": 0.1, "cpu_ms": {1: 0.5, 8: 4.0},
                                        "round_trip_ms": 0.2, "host_ms_per_layer": 0.0}  # measured on CUDA only
    per_layer = stats["per_layer"]
    assert sum(s["cpu_computed"] for s in per_layer) == stats["overall"]["cpu_computed"] > 0
    assert stats["overall"]["cpu_ms"] == pytest.approx(sum(s["cpu_ms"] for s in per_layer))
    line = summary_line(engine, 1.0)
    assert "cpu_compute auto (copy 1.00 ms/expert, device 0.10 ms/expert, CPU 1 tok 0.50 ms" in line
    assert "gate: precision >= 0.5" in line and "write-back " in line
    assert "computed on the CPU: " in stats_report(engine)
    metrics = Metrics(lambda: 0, lambda: engine.cache.stats).render().decode()
    assert f"offload_cpu_computed_experts_total {float(stats['overall']['cpu_computed'])}" in metrics
    assert "offload_cpu_compute_seconds_total" in metrics


def test_cpu_threads_sets_the_workers_count_only(tiny_dir):
    engine = load(tiny_dir, "always", 1, 0, cpu_threads=2)
    main = torch.get_num_threads()
    seen = []
    on_cpu = engine.model._expert_on_cpu
    engine.model._expert_on_cpu = lambda h, x: (seen.append(torch.get_num_threads()), on_cpu(h, x))[1]
    engine.generate_ids(PROMPT, max_new_tokens=2)
    assert seen and set(seen) == {2} and torch.get_num_threads() == main


@pytest.mark.parametrize("offload,message", [
    ({"cpu_compute": "yes"}, "offload.cpu_compute must be one of auto, off, always"),
    ({"cpu_compute": True}, "offload.cpu_compute must be one of"),
    ({"cpu_threads": 0}, "offload.cpu_threads must be a positive integer or null"),
    ({"cpu_threads": "4"}, "offload.cpu_threads must be a positive integer or null"),
])
def test_bad_cpu_keys_are_clear_errors(offload, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"offload": offload})
    assert load_config({}).offload.cpu_compute == "auto" and load_config({}).offload.cpu_threads is None


def fails_on_the_cpu_then_recovers(engine, expected: list[int], monkeypatch) -> None:
    """A CPU job that raises fails the request, leaves the cache consistent, and the next reply is exact."""
    def broken(host_slot, x):
        raise MemoryError("injected in a CPU job")
    monkeypatch.setattr(engine.model, "_expert_on_cpu", broken)
    with pytest.raises(MemoryError, match="injected"):
        engine.generate_ids(PROMPT, max_new_tokens=6)
    engine.cache.check_invariant()
    monkeypatch.undo()
    assert engine.generate_ids(PROMPT, max_new_tokens=6) == expected


def test_a_worker_failure_surfaces_and_leaves_the_cache_consistent(tiny_dir, monkeypatch):
    engine, fresh = load(tiny_dir, "always", 1, 1), load(tiny_dir, "off", 1, 1)
    expected = fresh.generate_ids(PROMPT, max_new_tokens=6)

    fails_on_the_cpu_then_recovers(engine, expected, monkeypatch)


def test_the_cache_refuses_to_move_an_expert_the_cpu_computes(tiny_dir):
    engine = load(tiny_dir, "off", 2, 0)
    cache = engine.cache
    expert = next(e for e in range(8) if cache.is_miss(0, e))
    cache.lend_host(0, expert)
    with pytest.raises(RuntimeError, match="being computed on the CPU"):
        cache.acquire(0, expert)
    with pytest.raises(RuntimeError, match="cpu_reading"):
        cache.check_invariant()
    with pytest.raises(ValueError, match="only a miss"):
        cache.lend_host(0, next(iter(cache.main[0])))
    cache.recover()  # gives the host slot back
    cache.check_invariant()


def test_calibration_measures_on_real_buffers(tiny_dir, monkeypatch):
    """calibrate's arithmetic on a CPU cache (on CUDA the loader runs it under auto): positive costs at 1, 2, 4, 8
    tokens from a real host slot, through the worker thread."""
    engine = load(tiny_dir, "always", 2, 1)
    model, layout = engine.model, engine.model.layout
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    costs = hybrid_module.calibrate(
        engine.cache, lambda slot, x: offload_engine.experts.expert_forward(layout, slot, x, model.kernels),
        model._expert_on_cpu, model.cpu_tier.worker, layout.hidden_size, torch.float32, torch.device("cpu"))
    assert [t for t, _ in costs.cpu_ms] == [1, 2, 4, 8] and all(ms > 0 for _, ms in costs.cpu_ms)
    assert costs.copy_ms > 0 and costs.device_ms > 0 and costs.round_trip_ms > 0 and synced


# ---- static placement (offload.cpu_layers, item 4) ----
@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v2"])  # deepseek: a dense first layer
def test_static_cpu_layers_equal_the_copy_only_engine(family_dirs, model_type):
    path = family_dirs[model_type]
    reference = load(path, "off", 2, 1)
    expected_logits, expected_tokens = reference.logits(IDS), reference.generate_ids(PROMPT, max_new_tokens=6)
    L = len(reference.model.moe_layers)
    for cpu_layers, mode in ((1, "off"), (1, "always"), ("all", "off")):
        engine = load(path, mode, 2, 1, cpu_layers=cpu_layers)
        where = f"{model_type} cpu_layers={cpu_layers} {mode}"
        assert (engine.logits(IDS) - expected_logits).abs().max().item() < 1e-4, where
        assert engine.generate_ids(PROMPT, max_new_tokens=6) == expected_tokens, where
        engine.cache.check_invariant()
        stats, n = engine.stats(), (L if cpu_layers == "all" else cpu_layers)
        assert stats["cpu_layers"] == n and len(stats["per_layer"]) == L, where
        for layer in stats["per_layer"][:n]:  # every expert used computed on the CPU, nothing copied
            assert layer["cpu_computed"] == layer["lookups"] > 0 and layer["bytes_h2d"] == layer["hits"] == 0, where
        assert engine.cache.num_layers == L - n
        per_layer_slots = engine.cache.k * engine.cache.nbytes
        if cpu_layers == "all":
            assert stats["device_bytes"] == 0 and stats["experts_on_device"] == 0
        else:  # no device slots for the static layers
            assert stats["device_bytes"] == reference.stats()["device_bytes"] - n * per_layer_slots
        assert stats["host_bytes"] >= n * num_experts(model_type) * engine.cache.nbytes
        engine.close()


def test_static_layers_in_the_load_line_stats_and_errors(tiny_dir, monkeypatch):
    from offload_engine.cli import summary_line

    engine = load(tiny_dir, "off", 2, 1, cpu_layers=2)
    assert "the experts of the first 2 MoE layers on the CPU (cpu_layers)" in summary_line(engine, 1.0)
    expected = load(tiny_dir, "off", 2, 1).generate_ids(PROMPT, max_new_tokens=6)

    fails_on_the_cpu_then_recovers(engine, expected, monkeypatch)
    for bad in (-1, "some", 1.5, True):
        with pytest.raises(ConfigError, match="offload.cpu_layers must be an integer >= 0"):
            load_config({"offload": {"cpu_layers": bad}})


def test_memory_plan_puts_the_first_layers_on_the_cpu_when_not_even_one_expert_fits():
    """auto on a GPU too small for one expert per layer: the plan keeps the first layers' experts in host RAM
    (static placement) rather than failing; a configured cpu_layers is planned as asked."""
    from transformers import MixtralConfig

    from offload_engine.config import load_config
    from offload_engine.memory import GiB, NotEnoughMemory, plan_memory

    hf = MixtralConfig()  # Mixtral-8x7B's shapes: 32 layers, 8 experts
    cfg = load_config({"dtype": "float16", "max_context": 1024, "offload": {"experts_on_device": "auto"}})
    roomy = plan_memory(hf, cfg, 16 * GiB)
    assert roomy.cpu_layers == 0 and roomy.experts_on_device >= 1
    one_each = plan_memory(hf, cfg.replace(experts_on_device=1), 16 * GiB)
    fixed = one_each.total_bytes - 32 * one_each.expert_bytes - one_each.spare_bytes
    free = fixed + one_each.spare_bytes + 20 * one_each.expert_bytes  # 20 layers' worth of one expert each
    small = plan_memory(hf, cfg, free)
    assert small.cpu_layers == 12 and small.experts_on_device == 1 and small.total_bytes <= free
    assert small.host_static_bytes == 12 * 8 * small.expert_bytes
    assert "the first 12 MoE layers' experts on the CPU" in small.summary()
    tiny = plan_memory(hf, cfg, fixed + GiB // 8)  # not one expert anywhere: every layer on the CPU
    assert tiny.cpu_layers == 32 and tiny.total_bytes <= fixed + GiB // 8
    with pytest.raises(NotEnoughMemory, match="even with every layer's experts on the CPU"):
        plan_memory(hf, cfg, fixed // 2)
    asked = plan_memory(hf, cfg.replace(experts_on_device=2, cpu_layers=4), 16 * GiB)
    assert asked.cpu_layers == 4 and asked.total_bytes == fixed + 28 * 2 * asked.expert_bytes + asked.spare_bytes


def test_the_hosts_work_per_layer_joins_the_calibration_and_moves_placement():
    """On CUDA the model reports the host's own time between layer calls (`note_host_ms`); its running mean is
    placement's join_ms: the first miss, on the CPU without it, is copied once the host's join is counted."""
    tier = hybrid_module.CpuTier("auto", torch.device("cuda"), threads=1, costs=MIXED)  # a device type only: nothing runs on it
    try:
        class Cache:  # expert 0 resident, 1 and 2 missed
            def is_miss(self, layer, expert):
                return expert != 0
        # 0.2 + 0.5 ms on the CPU beats the copy's 1 + 0.1 ms; the second would wait for the first on the CPU
        assert tier.place(Cache(), 0, {0: 1, 1: 1, 2: 1}, [0, 1, 2]) == {1}
        tier.note_host_ms(0.6)
        assert tier.costs.join_ms == pytest.approx(0.6)
        tier.note_host_ms(1.6)
        assert tier.costs.join_ms == pytest.approx(0.7)  # a running mean: 0.9 * 0.6 + 0.1 * 1.6
        assert "host 0.70 ms/layer" in tier.describe() and tier.calibration()["host_ms_per_layer"] == pytest.approx(0.7)
        # 0.2 + 0.7 + 0.5 ms loses to the copy's 1.1; the second miss would wait for that copy (2.1 ms): CPU
        assert tier.place(Cache(), 0, {0: 1, 1: 1, 2: 1}, [0, 1, 2]) == {2}
        off = hybrid_module.CpuTier("off", torch.device("cuda"))
        off.note_host_ms(5.0)
        assert off.costs is None  # nothing to weigh
    finally:
        tier.close()
