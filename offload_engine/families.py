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

    def model_class(self) -> type:
        return getattr(transformers, self.hf_class)

    def config_class(self) -> type:
        return self.model_class().config_class


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("Mixtral", "mixtral", "MixtralForCausalLM", "mistralai/Mixtral-8x7B-Instruct-v0.1",
           disk_block="block_sparse_moe", disk_matrices=("w1", "w3", "w2"),
           renames=((".mlp.gate.", ".block_sparse_moe.gate."),), masks="window", chat="mixtral"),
    Family("Qwen3-MoE", "qwen3_moe", "Qwen3MoeForCausalLM", "Qwen/Qwen3-30B-A3B", masks="window"),
    Family("Qwen2-MoE", "qwen2_moe", "Qwen2MoeForCausalLM", "Qwen/Qwen1.5-MoE-A2.7B", masks="layer_types"),
    Family("OLMoE", "olmoe", "OlmoeForCausalLM", "allenai/OLMoE-1B-7B-0924"),
    Family("DeepSeek-V2", "deepseek_v2", "DeepseekV2ForCausalLM", "deepseek-ai/DeepSeek-V2-Lite"),
    Family("GPT-OSS", "gpt_oss", "GptOssForCausalLM", "openai/gpt-oss-20b", router="router", activation="gpt_oss",
           masks="layer_types", block_returns_tuple=True),
    Family("Phi-3.5-MoE", "phimoe", "PhimoeForCausalLM", "microsoft/Phi-3.5-MoE-instruct", router="router",
           disk_block="block_sparse_moe", disk_matrices=("w1", "w3", "w2"),
           renames=((".mlp.router.", ".block_sparse_moe.gate."),), masks="window"),
    Family("GLM-4-MoE", "glm4_moe", "Glm4MoeForCausalLM", "zai-org/GLM-4.5-Air"),
    Family("ERNIE-4.5-MoE", "ernie4_5_moe", "Ernie4_5_MoeForCausalLM", "baidu/ERNIE-4.5-21B-A3B-PT",
           renames=((".mlp.gate.moe_statics.", ".mlp.moe_statics."),)),
    Family("HunYuan-MoE", "hunyuan_v1_moe", "HunYuanMoEV1ForCausalLM", "tencent/Hunyuan-A13B-Instruct"),
)}


class UnsupportedModel(ValueError):
    pass


def family_of(model_type: object) -> Family:
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported; offload_engine runs these mixture-of-experts families: "
            f"{', '.join(f'{f.name} ({t})' for t, f in FAMILIES.items())} (see the README's table of families)")
    return FAMILIES[model_type]
