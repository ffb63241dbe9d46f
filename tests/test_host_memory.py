"""Host RAM (issue 15): the offloaded experts are page-locked at their exact size, the plan checks host RAM before
anything is allocated, and the cache reports what it locks. Computed from the allocation plan: no GPU needed."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig

import offload_engine
from offload_engine.expert_cache import CacheAllocation, ExpertCache
from offload_engine.memory import HOST_MARGIN, NotEnoughMemory, plan_memory

from conftest import exact_config

MIXTRAL = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=32768, tie_word_embeddings=False)
T4_FREE = int(14.5 * 1024**3)  # torch.cuda.mem_get_info on a Colab T4 before loading
COLAB_RAM = int(12.7e9)


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def test_t4_locks_the_offloaded_experts_bytes():
    cfg = offload_engine.load_config("t4-16gb")
    plan = plan_memory(MIXTRAL, cfg, T4_FREE, host_free_bytes=COLAB_RAM)
    k, expert = plan.experts_on_device, plan.expert_bytes
    allocation = CacheAllocation.build(32, 8, expert, k, cfg.offload.prefetch, cuda=True)
    offloaded = 32 * (8 - k) * expert
    assert allocation.locked_host_bytes == plan.host_pinned_bytes
    assert abs(allocation.locked_host_bytes - offloaded) <= 0.02 * offloaded
    # What torch's pinned allocator would lock for one pin_memory=True tensor per layer (rounded to a power of two):
    rounded = 32 * next_power_of_two((8 - k) * expert)
    assert rounded > 1.3 * offloaded, "the rounding this avoids"
    assert plan.host_total_bytes == offloaded + HOST_MARGIN <= COLAB_RAM
    assert "pinned" in plan.summary()


def test_plan_refuses_a_host_ram_overflow_before_allocating():
    cfg = offload_engine.load_config("8gb")  # 2 experts/layer on an 8 GB GPU: 6 x 32 x 63.3 MiB = 11.9 GiB offloaded
    with pytest.raises(NotEnoughMemory, match=r"host RAM: 6 offloaded experts per layer need 11\.87 GiB page-locked.*"
                                              r"more RAM"):
        plan_memory(MIXTRAL, cfg, int(7.4 * 1024**3), host_free_bytes=COLAB_RAM)
    assert plan_memory(MIXTRAL, cfg, int(7.4 * 1024**3), host_free_bytes=16 * 1024**3).experts_on_device == 2
    explicit = offload_engine.load_config({"offload": {"experts_on_device": 3}})
    with pytest.raises(NotEnoughMemory, match="host RAM"):
        plan_memory(MIXTRAL, explicit, T4_FREE, host_free_bytes=4 * 1024**3)


def test_cache_allocates_what_the_plan_says(tiny_dir):
    cache = ExpertCache(num_layers=3, num_experts=8, expert_nbytes=1000, experts_on_device=3, prefetch=2,
                        device=torch.device("cpu"))
    allocation = CacheAllocation.build(3, 8, 1000, 3, 2, cuda=True)
    assert cache.host_bytes() == allocation.host_bytes == allocation.locked_host_bytes == 3 * 5 * 1000
    assert cache.device_bytes() == allocation.device_bytes == (3 * 3 + 2 + 2 * 2) * 1000  # spares: 2 + 2 x prefetch
    assert cache.locked_bytes == 0, "on CPU nothing is page-locked"
    engine = offload_engine.load(tiny_dir, config=exact_config(experts_on_device=5, prefetch=1), progress=False)
    stats = engine.stats()
    assert stats["host_bytes"] == 3 * 3 * engine.cache.nbytes and stats["host_locked_bytes"] == 0
    engine.close()
    assert engine.cache.host_bytes() == engine.cache.device_bytes() == 0


KAGGLE_RAM = int(29e9)  # Kaggle's T4 VMs


def test_write_back_auto_keeps_every_expert_in_host_ram_when_it_fits():
    """Issue 20 item 4: with room for all 8 experts per layer page-locked, nothing is written back; on Colab's
    12.7 GB the swap stays."""
    cfg = offload_engine.load_config("t4-16gb")
    assert cfg.offload.write_back == "auto"
    colab = plan_memory(MIXTRAL, cfg, T4_FREE, host_free_bytes=COLAB_RAM)
    kaggle = plan_memory(MIXTRAL, cfg, T4_FREE, host_free_bytes=KAGGLE_RAM)
    unknown = plan_memory(MIXTRAL, cfg, T4_FREE)
    assert colab.write_back and colab.write_back_mode == "always" and unknown.write_back
    assert not kaggle.write_back and kaggle.write_back_mode == "never"
    expert = kaggle.expert_bytes
    assert kaggle.host_pinned_bytes == 32 * 8 * expert  # every expert, exactly
    assert colab.host_pinned_bytes == 32 * (8 - colab.experts_on_device) * expert
    assert kaggle.experts_on_device == colab.experts_on_device == 5
    assert kaggle.spare_bytes == colab.spare_bytes - expert, "no write-back to drain: one spare fewer"
    assert "write-backs: no" in kaggle.summary() and "write-backs: yes" in colab.summary()


def test_write_back_never_is_refused_where_host_ram_is_short():
    cfg = offload_engine.load_config({"offload": {"experts_on_device": "auto", "write_back": "never"}})
    with pytest.raises(NotEnoughMemory, match=r"all 8 experts per layer \(write_back: never\).*offload\.write_back"):
        plan_memory(MIXTRAL, cfg, T4_FREE, host_free_bytes=COLAB_RAM)
    always = offload_engine.load_config({"offload": {"experts_on_device": "auto", "write_back": "always"}})
    assert plan_memory(MIXTRAL, always, T4_FREE, host_free_bytes=KAGGLE_RAM).write_back


@pytest.mark.parametrize("key,value", [("write_back", "sometimes"), ("write_back", True),
                                       ("prefetch_min_precision", 1.5), ("prefetch_min_precision", "high")])
def test_offload_keys_are_validated(key, value):
    with pytest.raises(offload_engine.ConfigError, match=f"offload.{key}"):
        offload_engine.load_config({"offload": {key: value}})


def test_no_write_back_cache_holds_every_expert_and_drops_evictions(tiny_dir, tiny_ref):
    allocation = CacheAllocation.build(3, 8, 1000, 3, 1, cuda=True, write_back=False)
    assert allocation.host_bytes == allocation.locked_host_bytes == 3 * 8 * 1000
    assert allocation.spare_slots == 1 + 2 * 1
    engine = offload_engine.load(tiny_dir, config=exact_config(experts_on_device=2, prefetch=1, write_back="never"),
                                 progress=False)
    assert engine.config.offload.write_back == "never" and not engine.cache.write_back
    ids = torch.randint(0, 160, (1, 12), generator=torch.Generator().manual_seed(5))
    expected = tiny_ref.generate(ids[:, :4], max_new_tokens=16, do_sample=False)[0, 4:].tolist()
    assert engine.generate_ids(ids[0, :4].tolist(), max_new_tokens=16) == expected
    stats = engine.stats()
    assert stats["host_bytes"] == 3 * 8 * engine.cache.nbytes
    assert stats["overall"]["evictions"] > 0 and stats["overall"]["bytes_d2h"] == 0
    assert all(engine.cache.host_of[layer] == {e: e for e in range(8)} for layer in range(3))
    engine.cache.check_invariant()
    # On a CPU device `auto` keeps the swap: the device slots are host RAM as well.
    auto = offload_engine.load(tiny_dir, config=exact_config(experts_on_device=2), progress=False)
    assert auto.config.offload.write_back == "always" and auto.cache.write_back
