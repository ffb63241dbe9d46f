"""The units of a conversion: each output byte range computed from exactly one source tensor.

An output tensor is a trunk tensor, a norm, a router, an attention projection (one packed buffer) or an expert
(one packed buffer of three quantized matrices). HQQ quantizes each matrix on its own, so an expert is three
units, one per matrix, each filling its own byte range of the expert's buffer. Every unit therefore needs one
source tensor, hence one shard, wherever the checkpoint's shard boundaries fall (an expert's w1, w3 and w2 may
sit in two or three shards): the converter never has to keep one shard waiting for another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpoint import SafetensorsCheckpoint
from ..experts import MATRICES, ExpertLayout
from ..model import attention_shapes
from ..prequantized import FILE_METADATA
from ..prequantized_io import TensorSpec, safetensors_header
from ..quantize import quantize_into, quantize_matrix


@dataclass(frozen=True)
class Unit:
    key: str  # journal key: the output tensor, plus "/w1" etc. for an expert's matrices
    tensor: str  # output tensor name
    file: str
    offset: int  # absolute byte offset in the output file
    nbytes: int
    source: str  # the one source tensor it reads
    shard: str
    matrix: str | None = None  # w1 / w3 / w2 for expert units


def _source(name: str, weight_map: dict[str, str], matrix: str | None) -> str:
    """The source tensor an output tensor (or an expert's matrix) is computed from, in either naming scheme."""
    if not name.startswith("model.layers."):
        return name
    parts = name.split(".")
    prefix = ".".join(parts[:3])
    if matrix is not None:
        per_expert = f"{prefix}.block_sparse_moe.experts.{parts[-1]}.{matrix}.weight"
        if per_expert in weight_map:
            return per_expert
        return f"{prefix}.mlp.experts.{'down_proj' if matrix == 'w2' else 'gate_up_proj'}"  # transformers 5 fused
    if ".self_attn." in name:
        return name + ".weight"
    if name.endswith("mlp.gate.weight"):
        old = f"{prefix}.block_sparse_moe.gate.weight"
        return old if old in weight_map else name
    return name


def build_units(plan: dict[str, list[TensorSpec]], weight_map: dict[str, str],
                layout: ExpertLayout) -> tuple[list[Unit], dict[str, int]]:
    """Every unit, in output order, and every output file's total size. Raises KeyError(source) if one is missing."""
    units, sizes = [], {}
    for file, specs in plan.items():
        offset = len(safetensors_header(specs, FILE_METADATA))
        for spec in specs:
            if ".experts." in spec.name:
                for m in MATRICES:
                    region = layout.matrices[m]
                    source = _source(spec.name, weight_map, m)
                    units.append(Unit(f"{spec.name}/{m}", spec.name, file, offset + region.start, region.nbytes,
                                      source, weight_map[source], m))
            else:
                source = _source(spec.name, weight_map, None)
                units.append(Unit(spec.name, spec.name, file, offset, spec.nbytes, source, weight_map[source]))
            offset += spec.nbytes
        sizes[file] = offset
    return units, sizes


def _expert_matrix(checkpoint: SafetensorsCheckpoint, unit: Unit, hf) -> torch.Tensor:
    H, I, E = hf.hidden_size, hf.intermediate_size, hf.num_local_experts
    if unit.source.endswith(".weight"):  # per-expert tensors
        return checkpoint.get(unit.source, (H, I) if unit.matrix == "w2" else (I, H))
    expert = int(unit.tensor.rsplit(".", 1)[1])
    if unit.matrix == "w2":
        return checkpoint.get(unit.source, (E, H, I))[expert]
    gate_up = checkpoint.get(unit.source, (E, 2 * I, H))[expert]
    return gate_up[:I] if unit.matrix == "w1" else gate_up[I:]


def compute(unit: Unit, checkpoint: SafetensorsCheckpoint, hf, cfg, quant_device: torch.device,
            layout: ExpertLayout) -> torch.Tensor:
    """The unit's bytes (a CPU or device tensor of `unit.nbytes` bytes): what engine.checkpoint_loader computes."""
    dtype = cfg.torch_dtype
    if unit.matrix is not None:
        weight = _expert_matrix(checkpoint, unit, hf).to(quant_device, dtype)
        buffer = torch.zeros(layout.nbytes, dtype=torch.uint8, device=quant_device)  # zeroed: reproducible padding
        region = layout.matrices[unit.matrix]
        quantize_into(weight, region, buffer)
        return buffer[region.start:region.start + region.nbytes]
    if ".self_attn." in unit.tensor:
        proj = unit.tensor.rsplit(".", 1)[1]
        weight = checkpoint.get(unit.source, attention_shapes(hf)[proj])
        return quantize_matrix(weight.to(quant_device, dtype), cfg.quant.attention, dtype)[1]
    if unit.tensor.endswith("mlp.gate.weight"):
        return checkpoint.get(unit.source, (hf.num_local_experts, hf.hidden_size)).to(dtype)
    shape = (hf.vocab_size, hf.hidden_size) if unit.tensor in ("model.embed_tokens.weight", "lm_head.weight") \
        else (hf.hidden_size,)
    return checkpoint.get(unit.source, shape).to(dtype)
