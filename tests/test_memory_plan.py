"""The memory plan holds at max_context (issue 21.3): a prefill's live tensors, measured op by op, stay within the
plan's KV cache + prefill working memory; and the T4 plan for Mixtral-8x7B budgets it."""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import MixtralConfig

import offload_engine
from offload_engine.memory import GiB, PREFILL_CHUNK, kv_cache_bytes, plan_memory, prefill_bytes

from conftest import exact_config
from families_cases import make_family_checkpoint


class LiveTensors(TorchDispatchMode):
    """Peak bytes of the storages created by the ops run under it and still referenced (views share theirs).
    Fused kernels' internal workspaces are not seen: only what lives between ops."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors alive]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                entry = self.live.setdefault(storage.data_ptr(), [storage.nbytes(), 0])
                if entry[1] == 0:
                    self.now += entry[0]
                    self.peak = max(self.peak, self.now)
                entry[1] += 1
                weakref.finalize(t, self._drop, storage.data_ptr())
        return out

    def _drop(self, address: int) -> None:
        entry = self.live[address]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[address]


CONTEXT = 2 * PREFILL_CHUNK  # a prompt to max_context is prefilled in two chunks

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "gpt_oss"])
def test_a_prefill_to_max_context_stays_within_the_plan(tmp_path, family):
    path = make_family_checkpoint(tmp_path / family, family, max_position_embeddings=CONTEXT)
    engine = offload_engine.load(path, config={**exact_config(), "max_context": CONTEXT}, device="cpu",
                                 progress=False)
    hf, cfg = engine.model.config, engine.config
    prompts = [torch.randint(0, 160, (CONTEXT - 1,)).tolist(), [5, 6, 7], [8] * 40]
    for sequences in (1, 3):
        with LiveTensors() as live:
            out = engine.generate_ids(prompts[0] if sequences == 1 else prompts, max_new_tokens=1)
        planned = sequences * kv_cache_bytes(hf, cfg, CONTEXT) + prefill_bytes(hf, cfg, CONTEXT, sequences)
        assert out and live.peak <= planned, (family, sequences, live.peak, planned)
        # The plan is a bound, not a blanket: within 3x of what the prefill really holds.
        assert planned < 3 * live.peak, (family, sequences, live.peak, planned)


def test_the_t4_plan_budgets_a_prefill_at_max_context():
    mixtral = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, num_local_experts=8)
    cfg = offload_engine.load_config("t4-16gb")
    plan = plan_memory(mixtral, cfg, int(14.5 * GiB))
    assert plan.context == cfg.max_context == 4096 and plan.experts_on_device == 5
    assert plan.prefill_bytes == prefill_bytes(mixtral, cfg, 4096) and plan.prefill_bytes < 0.2 * GiB
    # What an unchunked prompt on SDPA's math kernel would need for its scores alone: [32, 4096, 4096] float32.
    assert 32 * 4096 * 4096 * 4 > 10 * plan.prefill_bytes
    assert plan.total_bytes <= 14.5 * GiB
    fewer_experts = dataclasses.replace(cfg, offload=dataclasses.replace(cfg.offload, experts_on_device=4))
    batch = plan_memory(mixtral, fewer_experts, int(14.5 * GiB), sequences=4)
    assert batch.kv_cache_bytes == 4 * kv_cache_bytes(mixtral, cfg, 4096) and batch.sequences == 4


def test_max_batch_in_the_config_leaves_room_for_its_kv_caches(monkeypatch):
    """`experts_on_device: auto` on a GPU plans `max_batch` KV caches (what offload-serve --max-batch sets), so a
    batch is not left with the room of one sequence after the experts took the rest."""
    from offload_engine import memory
    from offload_engine.memory import resolve_max_batch, resolve_offload

    mixtral = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, num_local_experts=8)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(14.5 * GiB), 15 * GiB))
    colab_ram = int(11.8 * GiB)
    monkeypatch.setattr(memory, "available_host_bytes", lambda: colab_ram)
    cuda = torch.device("cuda")
    t4 = offload_engine.load_config("t4-16gb")
    alone = t4.replace(experts_on_device="auto")
    batch = dataclasses.replace(alone, max_batch=4)
    k_alone, k_batch = resolve_offload(alone, mixtral, cuda)[0], resolve_offload(batch, mixtral, cuda)[0]
    assert k_batch < k_alone == 5
    plan = plan_memory(mixtral, batch, int(14.5 * GiB), host_free_bytes=colab_ram, sequences=4)
    assert plan.experts_on_device == k_batch
    # After a load that planned for 4, the memory left holds them: the server takes the config's 4.
    left = int(14.5 * GiB) - plan.total_bytes \
        + 4 * kv_cache_bytes(mixtral, batch, 4096) + prefill_bytes(mixtral, batch, 4096, 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (left, 15 * GiB))
    assert resolve_max_batch(mixtral, batch, cuda, None)[0] == 4
    with pytest.raises(offload_engine.config.ConfigError, match="max_batch must be an integer >= 1"):
        offload_engine.load_config({"max_batch": 0})
