"""Tiny random checkpoints of every supported family, saved by transformers' own classes (save_pretrained)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from offload_engine.families import FAMILIES

COMMON = dict(vocab_size=160, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_experts_per_tok=2,
              max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)

# Each family's own features, small: dense layers, shared experts, MLA, grouped top-k, sinks, sliding windows.
CONFIGS: dict[str, dict] = {
    "mixtral": dict(intermediate_size=32, num_key_value_heads=2, num_local_experts=8),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=32, num_key_value_heads=2, head_dim=16,
                      num_experts=8, norm_topk_prob=True, mlp_only_layers=[1]),  # layer 1 dense
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      num_key_value_heads=2, num_experts=8, norm_topk_prob=False),  # q/k/v biases, shared expert
    "olmoe": dict(intermediate_size=32, num_key_value_heads=4, num_experts=8),  # q/k norms
    "deepseek_v2": dict(intermediate_size=48, moe_intermediate_size=32, num_key_value_heads=4, n_routed_experts=8,
                        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, topk_method="group_limited_greedy",
                        n_group=4, topk_group=2, routed_scaling_factor=1.5),  # MLA, dense layer 0, grouped top-k
    "gpt_oss": dict(intermediate_size=32, num_key_value_heads=2, head_dim=16, num_local_experts=8, sliding_window=5,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "phimoe": dict(intermediate_size=32, num_key_value_heads=2, num_local_experts=8),  # LayerNorms, sparsemixer
    "glm4_moe": dict(intermediate_size=48, moe_intermediate_size=32, num_key_value_heads=2, head_dim=16,
                     n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                     use_qk_norm=True, partial_rotary_factor=0.5),  # sigmoid router with score bias
    "ernie4_5_moe": dict(intermediate_size=48, moe_intermediate_size=32, num_key_value_heads=2, moe_num_experts=8,
                         moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2),
    "hunyuan_v1_moe": dict(intermediate_size=32, num_key_value_heads=2, head_dim=16, num_experts=8, moe_topk=2,
                           use_qk_norm=True),
}
assert set(CONFIGS) == set(FAMILIES), "every row of the adapter table needs a tiny test checkpoint"


def family_config(model_type: str, **overrides):
    return FAMILIES[model_type].config_class()(**{**COMMON, **CONFIGS[model_type], **overrides})


def num_experts(model_type: str) -> int:
    config = family_config(model_type)
    return next(getattr(config, k) for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
                if getattr(config, k, None) is not None)


def make_family_checkpoint(path: Path, model_type: str, seed: int = 0, std: float = 0.15, **overrides) -> Path:
    """A randomly initialised tiny model of `model_type`, saved with save_pretrained. Larger-than-default weights
    (and random biases and sinks) so that routing and logits are far from uniform."""
    torch.manual_seed(seed)
    model = FAMILIES[model_type].model_class()(family_config(model_type, **overrides))
    with torch.no_grad():
        for name, p in model.state_dict(keep_vars=True).items():  # buffers too: GLM-4's router score bias
            if p.dim() > 1:
                p.normal_(0, std)
            elif name.endswith(("bias", "sinks")):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return path


def mxfp4_encode(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> blocks [out, in/32, 16] uint8, scales [out, in/32] uint8: each 32 values share a power of two
    (the exponent + 127), each value rounded to the nearest FP4 (e2m1) value, two a byte, low nibble first."""
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    groups = weight.reshape(weight.shape[0], -1, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0)).to(torch.int32)  # [out, G]
    scaled = groups / torch.exp2(exponent.float())[..., None]
    codes = (scaled.abs()[..., None] - values).abs().argmin(-1) + 8 * (scaled < 0)  # [out, G, 32]
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exponent + 127).to(torch.uint8)


def mxfp4_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A GPT-OSS state dict with its fused experts as the releases store them: `{fused}_blocks` / `{fused}_scales`
    in place of each gate_up_proj / down_proj."""
    out = dict(tensors)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        fused = out.pop(name)  # [E, in, out] (GPT-OSS is transposed)
        encoded = [mxfp4_encode(fused[e].T.contiguous()) for e in range(fused.shape[0])]
        out[f"{name}_blocks"] = torch.stack([b for b, _ in encoded])
        out[f"{name}_scales"] = torch.stack([s for _, s in encoded])
    return out


def reference(path: Path, model_type: str):
    cls = getattr(transformers, FAMILIES[model_type].hf_class)
    return cls.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
