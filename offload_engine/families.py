"""The adapter table: one row per supported `model_type`, saying where a family keeps what the engine replaces.

Everything but the routed experts stays the family's own transformers module (attention with GQA, MLA, sliding
windows or sinks; norms; routers with their softmax/sigmoid, biases and grouped top-k; shared experts; dense MLP
layers), so a row only has to say what transformers does not: where the MoE block, its router and its experts
sit; how the experts are named on disk; which activation joins gate and up; which attention masks the layers
take. Which layers are MoE (DeepSeek's `first_k_dense_replace`, Qwen2-MoE's `mlp_only_layers`, ...) is read off
the family's own modules once built, not restated here.

Adding a family = a row here + its tiny config in tests/families_cases.py (tests/test_families.py runs every
check on every row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import transformers


@dataclass(frozen=True)
class Family:
    name: str  # as people call it
    model_type: str  # config.json's model_type
    hf_class: str  # the transformers class whose modules (all but the routed experts) the engine runs
    example: str  # a hub checkpoint of this family (README table, error messages)
    router: str = "gate"  # the MoE block's attribute holding the router module: (logits, weights, indices)
    # On disk, `save_pretrained` and the hub write one tensor per expert and matrix:
    #   model.layers.{l}.{disk_block}.experts.{e}.{gate|up|down}.weight
    # (a fused 3-D `{block}.experts.gate_up_proj` / `down_proj` is read too, one expert at a time).
    disk_block: str = "mlp"
    disk_matrices: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    # Trunk tensors whose on-disk name differs from the module's: (module fragment, disk fragment), tried in order.
    renames: tuple[tuple[str, str], ...] = ()
    activation: str = "swiglu"  # experts.ACTIVATIONS: swiglu = down(silu(gate) * up); gpt_oss = clamped, biased
    # Attention masks: "causal"; "window" (sliding when config.sliding_window is set, as Mixtral does);
    # "layer_types" (config.layer_types names each layer's mask: full_attention / sliding_attention).
    masks: str = "causal"
    block_returns_tuple: bool = False  # GPT-OSS's MoE block returns (hidden, router scores)
    chat: str = "template"  # "template": the tokenizer's chat template; "mixtral": [INST] as mistral-common
    # config.json keys that size this family's experts (and attention, where it differs): every checkpoint of the
    # family has them, and the config class would otherwise fill in a default that does not fit the weights.
    keys: tuple[str, ...] = ("num_local_experts", "intermediate_size")
    head_dim_null: bool = False  # "head_dim": null is fine (Mixtral: hidden_size / heads; MLA does not use it)

    def model_class(self) -> type:
        return getattr(transformers, self.hf_class)

    def config_class(self) -> type:
        return self.model_class().config_class


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("Mixtral", "mixtral", "MixtralForCausalLM", "mistralai/Mixtral-8x7B-Instruct-v0.1",
           disk_block="block_sparse_moe", disk_matrices=("w1", "w3", "w2"),
           renames=((".mlp.gate.", ".block_sparse_moe.gate."),), masks="window", chat="mixtral", head_dim_null=True),
    Family("Qwen3-MoE", "qwen3_moe", "Qwen3MoeForCausalLM", "Qwen/Qwen3-30B-A3B", masks="window",
           keys=("num_experts", "moe_intermediate_size")),
    Family("Qwen2-MoE", "qwen2_moe", "Qwen2MoeForCausalLM", "Qwen/Qwen1.5-MoE-A2.7B", masks="layer_types",
           keys=("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size")),
    Family("OLMoE", "olmoe", "OlmoeForCausalLM", "allenai/OLMoE-1B-7B-0924", keys=("num_experts", "intermediate_size")),
    Family("DeepSeek-V2", "deepseek_v2", "DeepseekV2ForCausalLM", "deepseek-ai/DeepSeek-V2-Lite",
           keys=("n_routed_experts", "moe_intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                 "v_head_dim"), head_dim_null=True),
    Family("GPT-OSS", "gpt_oss", "GptOssForCausalLM", "openai/gpt-oss-20b", router="router", activation="gpt_oss",
           masks="layer_types", block_returns_tuple=True, keys=("num_local_experts", "intermediate_size", "head_dim")),
    Family("Phi-3.5-MoE", "phimoe", "PhimoeForCausalLM", "microsoft/Phi-3.5-MoE-instruct", router="router",
           disk_block="block_sparse_moe", disk_matrices=("w1", "w3", "w2"),
           renames=((".mlp.router.", ".block_sparse_moe.gate."),), masks="window"),
    Family("GLM-4-MoE", "glm4_moe", "Glm4MoeForCausalLM", "zai-org/GLM-4.5-Air",
           keys=("n_routed_experts", "moe_intermediate_size")),
    Family("ERNIE-4.5-MoE", "ernie4_5_moe", "Ernie4_5_MoeForCausalLM", "baidu/ERNIE-4.5-21B-A3B-PT",
           renames=((".mlp.gate.moe_statics.", ".mlp.moe_statics."),),
           keys=("moe_num_experts", "moe_intermediate_size")),
    Family("HunYuan-MoE", "hunyuan_v1_moe", "HunYuanMoEV1ForCausalLM", "tencent/Hunyuan-A13B-Instruct",
           keys=("num_experts", "intermediate_size")),
)}


class UnsupportedModel(ValueError):
    pass


def family_of(model_type: object) -> Family:
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported; offload_engine runs these mixture-of-experts families: "
            f"{', '.join(f'{f.name} ({t})' for t, f in FAMILIES.items())} (see the README's table of families)")
    return FAMILIES[model_type]


def config_problems(raw: dict, family: Family) -> list[str]:
    """What config.json (as read, `raw`) lacks or gets wrong for `family`: each of the family's `keys` must be
    there (under its name or an alias of the config class) as a positive integer, and head_dim, when given, too."""
    aliases = getattr(family.config_class(), "attribute_map", {})
    problems = []
    for key in family.keys:
        names = [key, *(a for a, target in aliases.items() if target == key), aliases.get(key)]
        given = next((name for name in names if name in raw), None)
        if given is None:
            problems.append(f"{key} is missing")
        elif not _positive_size(raw[given]):
            problems.append(f"{given} must be a positive integer, got {json.dumps(raw[given])}")
    head_dim = raw.get("head_dim", 1)  # left out: the family computes it
    if not (_positive_size(head_dim) or (head_dim is None and family.head_dim_null)):
        problems.append(f"head_dim must be a positive integer, got {json.dumps(head_dim)}")
    return problems


def _positive_size(value: object) -> bool:
    """A size: a positive integer (some families give one per layer: a non-empty list of them)."""
    values = value if isinstance(value, list) and value else [value]
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def family_of_architectures(raw: dict) -> Family | None:
    """The family whose transformers class config.json's `architectures` names, if it is one of the table's."""
    names = raw.get("architectures") or []
    return next((f for f in FAMILIES.values() if f.hf_class in names), None)
