#!/usr/bin/env python
"""The README's table of families: parameters, bytes per packed expert at 2/3/4 bits, and how many experts per
layer `experts_on_device: auto` fits on 16 GB, 12 GB and 24 GB GPUs, for real checkpoints of each family.

    python scripts/families_table.py

Computed, not measured: each checkpoint's shapes are written below (copied from its config.json on the hub; no
download), the model is built by its transformers class on the meta device (nothing allocated), parameters are
counted from it, expert bytes come from `ExpertLayout`, and the experts per layer from `memory.plan_memory` under
the packaged configs t4-16gb (14.5 GiB free), 12gb (11.3 GiB) and 24gb (23.2 GiB), the free memory of the README's
memory table; host RAM is not checked here.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402

from offload_engine.anatomy import Anatomy  # noqa: E402
from offload_engine.config import QuantSpec, load_config  # noqa: E402
from offload_engine.experts import ExpertLayout  # noqa: E402
from offload_engine.families import FAMILIES  # noqa: E402
from offload_engine.memory import GiB, NotEnoughMemory, plan_memory  # noqa: E402

GPT_OSS = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
               num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
               layer_types=["sliding_attention", "full_attention"] * 12, tie_word_embeddings=False)  # gpt-oss-20b
# (checkpoint, model_type, config.json fields that matter for shapes)
CHECKPOINTS = [
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)),
    ("mistralai/Mixtral-8x22B-Instruct-v0.1", "mixtral", dict(
        vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)),
    ("Qwen/Qwen3-30B-A3B", "qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, tie_word_embeddings=False)),
    ("Qwen/Qwen1.5-MoE-A2.7B", "qwen2_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        num_experts=60, num_experts_per_tok=4, tie_word_embeddings=False)),
    ("allenai/OLMoE-1B-7B-0924", "olmoe", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, tie_word_embeddings=False)),
    ("deepseek-ai/DeepSeek-V2-Lite", "deepseek_v2", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, tie_word_embeddings=False)),
    ("openai/gpt-oss-20b", "gpt_oss", GPT_OSS),
    ("openai/gpt-oss-120b", "gpt_oss", {**GPT_OSS, "num_hidden_layers": 36, "num_local_experts": 128,
                                        "layer_types": ["sliding_attention", "full_attention"] * 18}),
    ("microsoft/Phi-3.5-MoE-instruct", "phimoe", dict(
        vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2, tie_word_embeddings=False)),
]
BITS = {2: QuantSpec(2, 16), 3: QuantSpec(3, 64), 4: QuantSpec(4, 64)}  # the packaged configs' expert specs
# Every row of the adapter table is tested by tests/test_families.py, on tiny random checkpoints of the family's class.
TESTED = "yes (tiny random checkpoint), not on these weights"
GPUS = [("16 GB", "t4-16gb", 14.5), ("12 GB", "12gb", 11.3), ("24 GB", "24gb", 23.2)]


def parameters(config) -> int:
    with init_empty_weights():
        model = FAMILIES[config.model_type].model_class()(config)
    return sum(p.numel() for p in model.parameters())


def expert_bytes(anatomy: Anatomy, spec: QuantSpec) -> int:
    """One packed expert in float16 (the packaged configs' dtype)."""
    return ExpertLayout.build(anatomy.hidden_size, anatomy.expert_intermediate, spec, torch.float16,
                              anatomy.expert_bias).nbytes


def fits(config, preset: str, free_gib: float, experts: int) -> str:
    try:
        k = plan_memory(config, load_config(preset), int(free_gib * GiB)).experts_on_device
    except NotEnoughMemory:
        return "does not fit"
    return f"{k} of {experts}"


def main() -> None:
    print("command:", " ".join(["python", *sys.argv]))
    print(f"transformers {transformers.__version__}; computed from shapes (nothing downloaded or measured); "
          "MiB = 2^20 bytes; 16/12/24 GB = the t4-16gb (4/2 bits), 12gb (4/2) and 24gb (4/3) configs")
    print("| family | example checkpoint | params | experts (MoE layers x per layer, top-k) "
          "| bytes/expert at 2 / 3 / 4 bits | experts/layer on 16 GB | 12 GB | 24 GB | tested |")
    print("|---|---|---:|---|---|---|---|---|---|")
    for name, model_type, fields in CHECKPOINTS:
        family = FAMILIES[model_type]
        config = family.config_class()(**fields)
        anatomy = Anatomy.of(config)
        sizes = " / ".join(f"{expert_bytes(anatomy, spec) / 2**20:.2f}" for spec in BITS.values())
        E = anatomy.num_experts
        gpus = " | ".join(fits(config, preset, free, E) for _, preset, free in GPUS)
        print(f"| {family.name} | {name} | {parameters(config) / 1e9:.1f} B | {len(anatomy.moe_layers)} x {E}, "
              f"top-{anatomy.top_k} | {sizes} MiB | {gpus} | {TESTED} |")


if __name__ == "__main__":
    main()
