"""Speculative prefetch (issue 3): exactness, recall on a model built to be predictable, counter consistency."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import offload_engine
from offload_engine.prefetch import PrefetchGate

from conftest import exact_config, make_checkpoint


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_prefetch_never_changes_results(tiny_dir, tiny_ref, k, prefetch):
    engine = offload_engine.load(tiny_dir, config=exact_config(experts_on_device=k, prefetch=prefetch), progress=False)
    ids = torch.randint(0, 160, (1, 12), generator=torch.Generator().manual_seed(3))
    assert (engine.logits(ids) - tiny_ref(ids).logits).abs().max().item() < 1e-4
    expected = tiny_ref.generate(ids[:, :4], max_new_tokens=16, do_sample=False)[0, 4:].tolist()
    assert engine.generate_ids(ids[0, :4].tolist(), max_new_tokens=16) == expected


def _predictable(model) -> None:
    """Zero every attention output and expert down-projection: the residual stream is then the token embedding
    at every layer, so layer l+1's router sees at layer l exactly what it will see itself."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()


def _decode(engine, tokens: list[int]) -> None:
    """Teacher-forced decode: one token per forward, with a KV cache (stats reset after the first token)."""
    kv_cache = DynamicCache(config=engine.model.config)
    for i, token in enumerate(tokens):
        engine.model(torch.tensor([[token]]), kv_cache)
        if i == 0:
            engine.reset_stats()


def test_prefetch_recall_is_perfect_when_routers_agree(tmp_path):
    model_dir = make_checkpoint(tmp_path / "predictable", edit=_predictable)
    engine = offload_engine.load(model_dir, config=exact_config(experts_on_device=1, prefetch=2), progress=False)
    tokens = torch.randint(0, 160, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    _decode(engine, tokens)
    stats = engine.stats()["overall"]
    assert stats["misses"] == 0, "every expert should have been prefetched in time"
    assert stats["prefetch_recall"] == 1.0 and stats["prefetch_precision"] == 1.0
    assert stats["prefetch_used"] > 0 and stats["lookups"] == 39 * 3 * 2

    # Without prefetch, the same cache misses: the zero above is prefetch's doing.
    engine = offload_engine.load(model_dir, config=exact_config(experts_on_device=1, prefetch=0), progress=False)
    _decode(engine, tokens)
    assert engine.stats()["overall"]["misses"] > 20


@pytest.mark.parametrize("k,prefetch", [(1, 1), (2, 2), (3, 1), (4, 2)])
def test_counters_are_consistent_on_a_random_model(tiny_dir, k, prefetch):
    engine = offload_engine.load(tiny_dir, config=exact_config(experts_on_device=k, prefetch=prefetch), progress=False)
    cache = engine.cache
    # The packed bytes of every expert right after loading: every lookup must return exactly these.
    pristine = {}
    for layer in range(3):
        for expert in range(8):
            home = cache.main[layer].get(expert)
            pristine[layer, expert] = (cache.slots[home] if home is not None
                                       else cache.host[layer][cache.host_of[layer][expert]]).clone()

    original_acquire, original_use, original_prefetch = cache.acquire, cache.use, cache.prefetch
    checked = []

    def checked_acquire(layer, expert, protect=(), lend=True):
        original_acquire(layer, expert, protect, lend)
        assert all(p in cache.main[layer] or p in cache.staged[layer] or p in cache.host_of[layer] for p in protect)

    def checked_use(layer, expert):
        buffer = original_use(layer, expert)
        assert torch.equal(buffer, pristine[layer, expert])
        checked.append(expert)
        return buffer

    def checked_prefetch(layer, guesses):
        before = dict(cache.main[layer])
        original_prefetch(layer, guesses)
        assert cache.main[layer] == before, "a prefetch must not displace resident experts"

    cache.acquire, cache.use, cache.prefetch = checked_acquire, checked_use, checked_prefetch
    tokens = torch.randint(0, 160, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    _decode(engine, tokens)
    s = engine.stats()["overall"]
    assert s["hits"] + s["misses"] == s["lookups"] == 29 * 3 * 2 == len(checked) - 3 * 2
    assert s["prefetch_issued"] == s["prefetch_used"] + s["prefetch_wasted"]
    # Every expert that comes in pushes one out, except when k < top_k and the resident is still needed
    # (then the newcomer is used in place and dropped).
    if k >= 2:
        assert s["evictions"] == s["misses"] + s["prefetch_used"]
    else:
        assert 0 < s["evictions"] < s["misses"] + s["prefetch_used"]
    assert s["bytes_h2d"] == (s["misses"] + s["prefetch_issued"]) * cache.nbytes
    assert s["bytes_d2h"] == s["evictions"] * cache.nbytes
    assert s["guessed"] == 29 * 3 * prefetch
    assert 0 <= s["prefetch_precision"] <= 1 and 0 <= s["prefetch_recall"] <= 1
    per_layer = engine.stats()["per_layer"]
    assert sum(layer["lookups"] for layer in per_layer) == s["lookups"]
    assert engine.stats()["host_syncs"] == 29 * (3 + 1)  # one per layer, plus the layer-0 guess


def test_prefetch_protects_the_current_tokens_experts():
    """A miss while a prefetch is staged must not drop the staged expert nor an expert still to be computed."""
    from offload_engine.expert_cache import ExpertCache

    cache = ExpertCache(num_layers=2, num_experts=6, expert_nbytes=4, experts_on_device=2, prefetch=2,
                        device=torch.device("cpu"))
    for layer in range(2):
        for e in range(6):
            cache.fill(layer, e, lambda buf, e=e: buf.fill_(e))
    cache.prefetch(1, [4, 5])  # guessed for the next layer while layer 0 runs
    cache.begin_layer(0, [2, 3])
    assert torch.all(cache.get(0, 2, protect=[3]) == 2)
    assert torch.all(cache.get(0, 3) == 3)
    cache.end_layer(0)
    assert set(cache.staged[1]) == {4, 5}, "layer 0's misses must not reclaim layer 1's prefetches"
    cache.begin_layer(1, [5, 0])
    assert torch.all(cache.get(1, 5, protect=[0]) == 5)
    assert 0 in cache.main[1], "the token still needs expert 0: it must not be the victim"
    assert torch.all(cache.get(1, 0) == 0)
    cache.end_layer(1)
    stats = cache.stats[1]
    assert (stats.prefetch_used, stats.prefetch_wasted, stats.guessed_correct) == (1, 1, 1)


@pytest.mark.cuda
def test_cuda_copies_run_on_side_streams_and_overlap_compute(tiny_dir, tiny_ref):
    """Copy-ins and write-backs run on their own streams: they finish while the compute stream is still busy
    (which would be impossible if they were queued on it), and the engine stays exact."""
    engine = offload_engine.load(tiny_dir, config=exact_config(experts_on_device=2, prefetch=2), device="cuda",
                                 progress=False)
    cache, streams = engine.cache, engine.cache.streams
    compute = torch.cuda.current_stream()
    assert len({streams.h2d, streams.d2h, compute}) == 3
    assert cache.host[0].is_pinned() and cache.locked_bytes == cache.host_bytes() > 0
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of a busy compute stream
    busy = torch.cuda.Event()
    busy.record(compute)
    missing = next(iter(cache.host_of[0]))
    victim_slots = dict(cache.main[0])
    cache.acquire(0, missing)  # a miss: copy-in on h2d, the victim's write-back on d2h
    victim = next(e for e in victim_slots if e not in cache.main[0])
    copied, written_back = cache.slot_written[cache.main[0][missing]], cache.slot_written_back[victim_slots[victim]]
    while not (copied.query() and written_back.query()) and not busy.query():
        pass
    assert not busy.query(), "the copies waited for the compute stream: they were queued on it"
    assert copied.query() and written_back.query()
    cache.recover()  # the acquired expert was never computed: give it back
    ids = torch.randint(0, 160, (1, 12), generator=torch.Generator().manual_seed(3))
    assert (engine.logits(ids) - tiny_ref(ids).logits).abs().max().item() < 1e-3
    expected = tiny_ref.generate(ids[:, :4], max_new_tokens=16, do_sample=False)[0, 4:].tolist()
    assert engine.generate_ids(ids[0, :4].tolist(), max_new_tokens=16) == expected
    assert engine.stats()["overall"]["bytes_d2h"] > 0
    cache.check_invariant()
    engine.close()
    assert engine.cache.locked_bytes == 0


@pytest.mark.cuda
def test_cuda_forward_makes_no_hidden_sync(tiny_dir):
    """Decode steps block the host only for the routing reads the engine counts (sync debug mode lists the rest)."""
    import warnings

    engine = offload_engine.load(tiny_dir, config=exact_config(experts_on_device=2, prefetch=1), device="cuda",
                                 progress=False)
    kv_cache = DynamicCache(config=engine.model.config)
    engine.model(torch.tensor([[1, 2, 3]]), kv_cache)
    engine.reset_stats()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for token in range(8):
                engine.model(torch.tensor([[token + 4]]), kv_cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= engine.stats()["host_syncs"] == 8 * (3 + 1), syncs


@pytest.mark.parametrize("k,prefetch", [(1, 2), (2, 1)])
def test_prefetch_without_write_backs_is_exact(tiny_dir, tiny_ref, k, prefetch):
    engine = offload_engine.load(tiny_dir, progress=False,
                                 config=exact_config(experts_on_device=k, prefetch=prefetch, write_back="never"))
    ids = torch.randint(0, 160, (1, 12), generator=torch.Generator().manual_seed(7))
    assert (engine.logits(ids) - tiny_ref(ids).logits).abs().max().item() < 1e-4
    expected = tiny_ref.generate(ids[:, :4], max_new_tokens=16, do_sample=False)[0, 4:].tolist()
    assert engine.generate_ids(ids[0, :4].tolist(), max_new_tokens=16) == expected
    assert engine.stats()["overall"]["prefetch_issued"] > 0 and engine.stats()["overall"]["bytes_d2h"] == 0


def test_gate_opens_on_measured_precision_only():
    gate = PrefetchGate(2, min_precision=0.9, warmup=4, half_life=8)
    assert not gate.open(0), "closed until its guesses are scored: an unproven layer copies nothing"
    for _ in range(4):
        gate.score(0, 1, 1)
        gate.score(1, 1, 0)
    assert gate.open(0) and not gate.open(1)
    for _ in range(40):  # layer 0's guesses go wrong, layer 1's right: the gate follows (old guesses fade)
        gate.score(0, 1, 0)
        gate.score(1, 1, 1)
    assert not gate.open(0) and gate.open(1)
    assert PrefetchGate(1).open(0), "min_precision 0: every guess is copied"


def test_engine_copies_guesses_only_for_layers_whose_precision_pays(tmp_path, tiny_dir):
    """A layer whose guesses are right keeps prefetch; a random model's guesses (well below 0.99) are scored but
    never copied."""
    model_dir = make_checkpoint(tmp_path / "predictable", edit=_predictable)
    tokens = torch.randint(0, 160, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    good = offload_engine.load(model_dir, progress=False,
                               config=exact_config(experts_on_device=1, prefetch=2, prefetch_min_precision=0.99))
    _decode(good, tokens)
    stats = good.stats()["overall"]
    assert stats["prefetch_precision"] == 1.0 and stats["prefetch_used"] > 0
    assert stats["misses"] <= 3 * 32, "only the warm-up's guesses (32 per layer) are not copied"
    bad = offload_engine.load(tiny_dir, progress=False,
                              config=exact_config(experts_on_device=1, prefetch=2, prefetch_min_precision=0.99))
    _decode(bad, tokens)
    stats = bad.stats()["overall"]
    assert stats["guessed"] > 0 and stats["prefetch_precision"] < 0.99
    assert stats["prefetch_issued"] == 0
