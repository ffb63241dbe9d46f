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
    assert cache.device_bytes() == allocation.device_bytes == (3 * 3 + 5) * 1000
    assert cache.locked_bytes == 0, "on CPU nothing is page-locked"
    engine = offload_engine.load(tiny_dir, config=exact_config(experts_on_device=5, prefetch=1), progress=False)
    stats = engine.stats()
    assert stats["host_bytes"] == 3 * 3 * engine.cache.nbytes and stats["host_locked_bytes"] == 0
    engine.close()
    assert engine.cache.host_bytes() == engine.cache.device_bytes() == 0
