"""The CUDA stream protocol, replayed on CPU (issue 15): stand-in streams log every copy and compute read, a
happens-before check finds any conflicting pair not ordered by events, on the real cache and model: in both
write-back modes, with the slot choice of issue 20 (the free slot freed longest ago) and the prefetch gate, and
with hybrid execution (issue 23: the CPU worker's reads of host slots, a third actor)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

import offload_engine
from offload_engine.expert_cache import ORDERING_STEPS, ExpertCache
from offload_engine.placement import PlacementCosts
from offload_engine.stream_check import SyncCounter, attach

from conftest import exact_config, make_checkpoint

N_CONFIGS = 40
# auto with given costs: a decode's first miss goes to the CPU, the second is copied (see test_hybrid.py), so the
# same expert is read by the CPU in one call and copied in (its host slot then written back into) in another.
CPU_MODES = {"off": "off", "always": "always", "mixed": "auto"}  # mixed: auto with MIXED's costs
MIXED = PlacementCosts(copy_ms=1.0, device_ms=0.1, cpu_ms=((1, 0.5), (8, 4.0)), round_trip_ms=0.2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny checkpoints with different top-k and expert counts (num_local_experts, num_experts_per_tok)."""
    shapes = [(8, 1), (8, 2), (8, 3), (6, 2)]
    return {shape: make_checkpoint(tmp_path_factory.mktemp(f"e{shape[0]}k{shape[1]}"), seed=sum(shape), num_hidden_layers=3,
                                   num_local_experts=shape[0], num_experts_per_tok=shape[1])
            for shape in shapes}


def random_configs(checkpoints, n: int, seed: int = 0):
    rng = random.Random(seed)
    shapes = sorted(checkpoints)
    for _ in range(n):
        experts, top_k = rng.choice(shapes)
        k = rng.randint(1, experts - 1)
        prefetch = rng.randint(0, min(2, experts - k))
        policy = rng.choice(["lru", "lru", "lfu", "lrfu"])
        prompts = [rng.randint(1, 20) for _ in range(rng.randint(1, 2))]
        write_back = rng.choice(["always", "always", "never"])
        gate = rng.choice([0.0, 0.0, 0.5])
        cpu = rng.choice(["off", "off", "mixed", "mixed", "always"])
        yield dict(shape=(experts, top_k), k=k, prefetch=prefetch, policy=policy, prompts=prompts,
                   seed=rng.randint(0, 999), write_back=write_back, gate=gate, cpu=cpu)


def run_recorded(checkpoints, config, new_tokens: int = 6):
    engine = offload_engine.load(checkpoints[config["shape"]], progress=False,
                                 config=exact_config(experts_on_device=config["k"], prefetch=config["prefetch"],
                                                     policy=config["policy"],
                                                     write_back=config.get("write_back", "always"),
                                                     prefetch_min_precision=config.get("gate", 0.0),
                                                     cpu_compute=CPU_MODES[config.get("cpu", "off")]))
    if config.get("cpu") == "mixed":
        engine.model.cpu_tier.costs = MIXED
    recorder = attach(engine.cache)
    gen = torch.Generator().manual_seed(config["seed"])
    tokens = [engine.generate_ids(torch.randint(0, 160, (n,), generator=gen).tolist(), max_new_tokens=new_tokens)
              for n in config["prompts"]]
    engine.cache.check_invariant()
    return engine, recorder, tokens


def test_protocol_has_no_race_on_random_configurations(checkpoints):
    copies, modes, cpu_reads = 0, set(), 0
    for config in random_configs(checkpoints, N_CONFIGS):
        engine, recorder, _ = run_recorded(checkpoints, config)
        assert not recorder.races, f"{config}: {recorder.report()}"
        cpu_reads += sum(entry[:2] == ("read", "cpu") for entry in recorder.log)
        assert (config["cpu"] == "off") <= (engine.stats()["overall"]["cpu_computed"] == 0)
        copies += sum(entry[0] == "copy" for entry in recorder.log)
        write_backs = sum(entry[0] == "copy" and entry[1] == "d2h" for entry in recorder.log)
        assert (write_backs > 0) == (config["write_back"] == "always" and engine.stats()["overall"]["evictions"] > 0)
        modes.add(config["write_back"])
    assert copies > 500, "the configurations should move experts a lot"
    assert modes == {"always", "never"}
    assert cpu_reads > 100, "the configurations should compute misses on the CPU too"


@pytest.mark.parametrize("write_back", ["always", "never"])
def test_new_slot_choice_never_reuses_a_slot_with_a_queued_write_back_first(checkpoints, write_back):
    """A copy-in takes the free slot freed longest ago: never the victim slot of the miss just before it while an
    older free slot exists (that slot's write-back would hold the copy-in up: issue 20)."""
    engine = offload_engine.load(checkpoints[8, 2], progress=False,
                                 config=exact_config(experts_on_device=2, prefetch=1, write_back=write_back))
    cache, taken = engine.cache, []
    original = type(cache)._take_free_slot

    def take(self):
        free = list(self.free_slots)
        slot = original(self)
        taken.append((slot, free))
        return slot
    type(cache)._take_free_slot, saved = take, original
    try:
        engine.generate_ids([3, 1, 4, 1, 5], max_new_tokens=12)
    finally:
        type(cache)._take_free_slot = saved
    assert len(taken) > 20 and all(slot == free[0] for slot, free in taken)
    assert engine.cache.allocation.spare_slots == (4 if write_back == "always" else 3)


# Without write-backs, host slots are never written: only the slot's reuse after compute and compute after the
# copy-in are left to order.
MUTATIONS = [(step, "always") for step in ORDERING_STEPS] + [
    ("copy_in_after_compute", "never"), ("compute_after_copy_in", "never")]
CPU_STEPS = ("cpu_read_after_write_back", "write_back_after_cpu_read")  # need write-backs and mixed placement


@pytest.mark.parametrize("step,write_back", MUTATIONS)
def test_removing_any_ordering_step_is_caught(checkpoints, monkeypatch, step, write_back):
    used = set()
    original = ExpertCache._after

    def mutated(self, stream, event, name):
        used.add(name)
        if name != step:
            original(self, stream, event, name)

    monkeypatch.setattr(ExpertCache, "_after", mutated)
    races = 0
    for config in random_configs(checkpoints, N_CONFIGS):
        if step in CPU_STEPS:
            config["cpu"] = "mixed"
        races += len(run_recorded(checkpoints, {**config, "write_back": write_back})[1].races)
        if races:
            break
    if write_back == "always":
        assert used == set(ORDERING_STEPS), "every named step should be exercised"
    assert step in used
    assert races, f"without '{step}' ({write_back} write-backs) the checker should find a race"


def test_demand_copies_go_before_speculation_and_before_compute(checkpoints):
    """Decode with k=1, top-2, prefetch 2: while layer l runs, its demand copies are queued before the speculative
    copies for layer l+1, and all of them before layer l's first expert computes."""
    engine = offload_engine.load(checkpoints[8, 2], progress=False, config=exact_config(experts_on_device=1, prefetch=2))
    recorder, cache = attach(engine.cache), engine.cache
    for name in ("begin_layer", "use"):
        original = getattr(cache, name)
        setattr(cache, name, lambda layer, arg, name=name, original=original:
                (recorder.log.append((name, layer)), original(layer, arg))[1])
    engine.generate_ids([3, 1, 4, 1, 5], max_new_tokens=12)
    calls, demand, speculative = [], 0, 0
    for entry in recorder.log:  # split the log into layer calls: [("begin_layer", l), ...]
        if entry[0] == "begin_layer":
            calls.append([])
        elif calls:
            calls[-1].append(entry)
    decode = calls[3:]  # the prefill may run out of spare slots and interleave copies with compute
    assert len(decode) == 11 * 3
    for i, ops in enumerate(decode):
        layer = i % 3
        copies = [(n, e[3][1]) for n, e in enumerate(ops)  # (the next token's layer-0 guess may come last)
                  if e[0] == "copy" and e[1] == "h2d" and e[3][1] in (layer, layer + 1)]
        first_use = next(n for n, e in enumerate(ops) if e == ("use", layer))
        assert [l for _, l in copies] == sorted(l for _, l in copies), f"a demand copy waited behind a guess: {ops}"
        assert all(n < first_use for n, l in copies if l == layer), f"a demand copy came after a compute: {ops}"
        demand += sum(l == layer for _, l in copies)
        speculative += sum(l == layer + 1 for _, l in copies)
    assert demand > 0 and speculative > 0


def test_write_backs_run_on_their_own_stream(checkpoints):
    engine, recorder, _ = run_recorded(checkpoints, dict(shape=(8, 2), k=2, prefetch=1, policy="lru", prompts=[5],
                                                         seed=1))
    copies = [entry for entry in recorder.log if entry[0] == "copy"]
    write_backs = [c for c in copies if c[2][0] == "host"]
    assert write_backs and all(c[1] == "d2h" and c[3][0] == "slot" for c in write_backs)
    assert all(c[1] == "h2d" for c in copies if c[2][0] == "slot")
    assert len({engine.cache.streams.h2d, engine.cache.streams.d2h, engine.cache.streams.compute}) == 3
    assert engine.stats()["overall"]["bytes_d2h"] == len(write_backs) * engine.cache.nbytes


@pytest.mark.parametrize("prefetch,cpu", [(0, "off"), (1, "off"), (1, "always")])
def test_host_syncs_per_decode_token_on_mixtral_shapes(tmp_path, prefetch, cpu):
    """Mixtral's routing shapes (32 layers, 8 experts, top-2): one routing read per layer per token, plus the layer-0
    guess with prefetch; no host-blocking wait in the cache. The count the engine reports equals the count seen.
    Hybrid execution adds one wait for the CPU worker's results per layer call that computed a miss there."""
    model_dir = make_checkpoint(tmp_path / "deep", num_hidden_layers=32, hidden_size=32, intermediate_size=32)
    engine = offload_engine.load(model_dir, progress=False, config=exact_config(experts_on_device=4, prefetch=prefetch,
                                                                                cpu_compute=cpu))
    recorder = attach(engine.cache)
    counter = SyncCounter()
    kv_cache = DynamicCache(config=engine.model.config)
    engine.model(torch.tensor([[5, 6, 7, 8]]), kv_cache)
    engine.reset_stats()
    calls, calls_on_cpu = [], set()  # layer calls; those that computed a miss on the CPU
    begin, lend = engine.cache.begin_layer, engine.cache.lend_host
    engine.cache.begin_layer = lambda layer, order: (calls.append(layer), begin(layer, order))[1]
    engine.cache.lend_host = lambda layer, expert: (calls_on_cpu.add(len(calls)), lend(layer, expert))[1]
    steps = 8
    with counter:
        for token in range(steps):
            engine.model(torch.tensor([[token + 10]]), kv_cache)
    per_token = counter.count / steps
    assert engine.stats()["host_syncs"] == counter.count
    joins = counter.count - steps * (32 + (1 if prefetch else 0))
    assert joins == len(calls_on_cpu) and (joins > 0) == (cpu == "always")
    assert recorder.host_syncs == 0 and engine.cache.host_waits == 0
    print(f"host syncs per decode token, 32 layers top-2 of 8, prefetch {prefetch}: {per_token:.0f}")
