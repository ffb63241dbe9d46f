"""What a model is made of, read off the family's own transformers modules built on the meta device.

`Anatomy.of(config)` builds the family's class without allocating anything, and lists
  * which decoder layers are MoE (their MLP holds a routed-experts module) and the experts' shapes;
  * every trunk tensor (all that is not a routed expert): its name, shape, and how it is stored: linear
    layers quantized per `quant.attention` (inside self_attn) or `quant.trunk` (shared experts, dense MLPs),
    everything else (embeddings, norms, routers, biases, attention sinks) kept in the model dtype.
The loader, the memory plan, the pre-quantized format and the converter all work from this one list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from accelerate import init_empty_weights

from .checkpoint import CheckpointError
from .config import EngineConfig
from .experts import ExpertLayout
from .families import Family, family_of
from .quantize import MatrixLayout


@dataclass(frozen=True)
class TrunkTensor:
    name: str  # a parameter's name ("model.norm.weight"), or a quantized linear's module ("...self_attn.q_proj")
    shape: tuple[int, ...]
    part: str | None  # "attention" / "trunk": quantized per quant.<part> ([out, in]); None: a plain tensor
    layer: int | None  # the decoder layer, None outside the layers
    float32: bool = False  # kept in float32 whatever the model dtype (the family's own rule, e.g. DeepSeek's router)

    def layout(self, cfg: EngineConfig) -> MatrixLayout:
        return MatrixLayout.build(self.shape, getattr(cfg.quant, self.part), cfg.torch_dtype)

    def dtype(self, cfg: EngineConfig) -> torch.dtype:
        return torch.float32 if self.float32 else cfg.torch_dtype

    def nbytes(self, cfg: EngineConfig) -> int:
        if self.part is not None:
            return self.layout(cfg).nbytes
        return self.dtype(cfg).itemsize * int(torch.Size(self.shape).numel())


def skeleton(config, family: Family,
             default_dtype: torch.dtype | None = None) -> tuple[nn.Module, list[int], nn.Module]:
    """The family's model on the meta device with every routed-experts module removed; -> (model, the MoE layers'
    indices, one of the removed experts modules, which carries the experts' shapes and flags). `default_dtype`:
    torch's default while the modules are built (parameters a family creates in float32 on purpose stay so); set
    process-wide for that moment, as transformers' own `from_pretrained(dtype=...)` does."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype or previous)
    try:
        with init_empty_weights():
            model = family.model_class()(config)
    except (TypeError, AttributeError, KeyError, IndexError, ZeroDivisionError) as e:
        # config.json passed checkpoint.read_config's checks, yet transformers cannot build the family from it
        raise CheckpointError(f"the {family.name} ({family.model_type}) model cannot be built from this config.json "
                              f"({type(e).__name__}: {e}); check its model_type and keys against a {family.name} "
                              f"checkpoint's, e.g. {family.example}") from e
    finally:
        torch.set_default_dtype(previous)
    moe_layers, experts = [], None
    for i, layer in enumerate(model.model.layers):
        block = layer.mlp
        if hasattr(block, "experts") and hasattr(block, family.router):
            moe_layers.append(i)
            experts = block.experts
            block.experts = None  # the engine puts its own module here (model.OffloadedExperts)
    if experts is None:
        raise ValueError(f"this {family.model_type} config has no MoE layer; nothing would be offloaded")
    return model, moe_layers, experts


def _fp32_patterns(model: nn.Module, cfg_dtype: torch.dtype) -> list[str]:
    """Parameters transformers' loading keeps in float32 by name: `_keep_in_fp32_modules_strict` always, the loose
    list only in float16 (its own rule)."""
    patterns = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if cfg_dtype == torch.float16:
        patterns += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return patterns


@dataclass(frozen=True)
class Anatomy:
    family: Family
    moe_layers: tuple[int, ...]  # decoder layers whose MLP is an MoE block; the expert cache numbers them 0, 1, ...
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate: int
    expert_bias: bool
    transposed: bool  # fused experts tensors stored [E, in, out] (GPT-OSS) rather than [E, out, in]
    interleaved: bool  # gate and up alternate along the fused dimension (GPT-OSS) rather than concatenated
    act_params: tuple[float, ...]
    trunk: tuple[TrunkTensor, ...]

    @staticmethod
    def of(config, dtype: torch.dtype = torch.float16) -> "Anatomy":
        family = family_of(config.model_type)
        # Built in bfloat16, so that what is still float32 is float32 on purpose (HunYuan's and DeepSeek's routers):
        # transformers keeps those in float32 whatever the model dtype, and so does the engine.
        model, moe_layers, experts = skeleton(config, family, torch.bfloat16)
        E, *dims = experts.gate_up_proj.shape
        H, two_i = dims if experts.is_transposed else dims[::-1]
        router = getattr(model.model.layers[moe_layers[0]].mlp, family.router)
        fp32 = _fp32_patterns(model, dtype)
        keep = {f"model.layers.{l}.mlp.{family.router}" for l in moe_layers}
        trunk, quantized = [], set()
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.startswith("model.layers.") and name.count(".") > 3 \
                    and not any(name == k or name.startswith(f"{k}.") for k in keep) and module.out_features > 1:
                # out_features 1: a scalar gate (Qwen2-MoE's shared_expert_gate), a router in all but name
                part = "attention" if ".self_attn." in name else "trunk"
                trunk.append(TrunkTensor(name, tuple(module.weight.shape), part, int(name.split(".")[2])))
                quantized.add(f"{name}.weight")
        tie = config.tie_word_embeddings
        # parameters and persistent buffers (e.g. GLM-4's router score bias): everything a checkpoint holds
        for name, param in model.state_dict(keep_vars=True).items():
            if name in quantized or (tie and name == "lm_head.weight"):
                continue
            layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
            float32 = param.dtype == torch.float32 or any(p in name for p in fp32)
            trunk.append(TrunkTensor(name, tuple(param.shape), None, layer, float32))
        act_params = (float(experts.alpha), float(experts.limit)) if family.activation == "gpt_oss" else ()
        return Anatomy(family, tuple(moe_layers), E, router.top_k, H, two_i // 2, experts.has_bias,
                       experts.is_transposed, not experts.is_concatenated, act_params,
                       tuple(sorted(trunk, key=_order)))

    def expert_layout(self, cfg: EngineConfig) -> ExpertLayout:
        return ExpertLayout.build(self.hidden_size, self.expert_intermediate, cfg.quant.experts, cfg.torch_dtype,
                                  self.expert_bias, self.family.activation, self.act_params)

    def quantized(self) -> list[TrunkTensor]:
        return [t for t in self.trunk if t.part is not None]

    def trunk_bytes(self, cfg: EngineConfig) -> int:
        return sum(t.nbytes(cfg) for t in self.trunk)


def _order(t: TrunkTensor) -> tuple:
    """Outside the layers first, then layer by layer; within a layer plain tensors before packed ones (so every
    typed tensor in a pre-quantized file stays aligned to its dtype), each in the module's own order."""
    return (t.layer is not None, t.layer or 0, t.part is not None)
