"""Where one routed expert's tensors are on disk, in every layout the families use, read one expert at a time.

* per-expert tensors (what `save_pretrained` and most hub checkpoints hold):
  model.layers.{l}.{disk_block}.experts.{e}.{gate|up|down}.weight, each [out, in] (names: the family's row);
* fused 3-D tensors (transformers 5's in-memory form; GPT-OSS on disk): model.layers.{l}.mlp.experts.gate_up_proj
  [E, 2I, H] ([E, H, 2I] transposed), down_proj [E, H, I] ([E, I, H]), biases gate_up_proj_bias [E, 2I] and
  down_proj_bias [E, H]; gate and up concatenated or interleaved (GPT-OSS). Read through safetensors slicing,
  so one expert costs one expert's bytes;
* MXFP4 (the GPT-OSS releases): `{fused}_blocks` [E, out, in/32, 16] uint8 (two FP4 values a byte, low nibble
  first) and `{fused}_scales` [E, out, in/32] (power-of-two exponents biased by 127), dequantized here.

Whatever the source, an expert comes out as w1 (gate) and w3 (up) [I, H], w2 (down) [H, I] and, with biases,
b1, b3 [I] and b2 [H]: the form `ExpertLayout.pack` takes.
"""

from __future__ import annotations

from typing import Container

import torch

from .anatomy import Anatomy

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FUSED = {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj",
         "b1": "gate_up_proj_bias", "b3": "gate_up_proj_bias", "b2": "down_proj_bias"}


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [R, G, 16] uint8, scales [R, G] uint8 -> [R, 32 G] float32 (each block of 32 values shares a scale)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # [R, G, 16, 2]
    values = values.reshape(*scales.shape, 32)  # [R, G, 32]
    return torch.ldexp(values, scales.to(torch.int32)[..., None] - 127).reshape(scales.shape[0], -1)


def expert_source(anatomy: Anatomy, available: Container[str], layer: int, expert: int, name: str) -> str:
    """The on-disk tensor holding `name` (w1 w3 w2 b1 b3 b2) of one expert: a per-expert tensor when the
    checkpoint has them, else the fused one (or, for MXFP4 checkpoints, its `_blocks`)."""
    family = anatomy.family
    if name in ("w1", "w3", "w2"):
        matrix = family.disk_matrices[("w1", "w3", "w2").index(name)]
        per_expert = f"model.layers.{layer}.{family.disk_block}.experts.{expert}.{matrix}.weight"
        if per_expert in available:
            return per_expert
    fused = f"model.layers.{layer}.mlp.experts.{FUSED[name]}"
    return fused if fused in available or f"{fused}_blocks" not in available else f"{fused}_blocks"


def expert_sources(anatomy: Anatomy, available: Container[str], layer: int, expert: int, name: str) -> tuple[str, ...]:
    """Every on-disk tensor that `name` of one expert is read from: `expert_source`, and for an MXFP4 matrix its
    `_scales` too (a checkpoint's shard boundary may fall between the two)."""
    source = expert_source(anatomy, available, layer, expert, name)
    return (source, _scales_of(source)) if source.endswith("_blocks") else (source,)


def _scales_of(blocks: str) -> str:
    return blocks.removesuffix("_blocks") + "_scales"


def read_expert_tensor(checkpoint, anatomy: Anatomy, layer: int, expert: int, name: str) -> torch.Tensor:
    """One expert's `name` as `ExpertLayout.pack` takes it. `checkpoint`: a checkpoint.SafetensorsCheckpoint."""
    source = expert_source(anatomy, checkpoint, layer, expert, name)
    H, I, E = anatomy.hidden_size, anatomy.expert_intermediate, anatomy.num_experts
    out_in = {"w1": (I, H), "w3": (I, H), "w2": (H, I)}
    if source.endswith(".weight"):  # per-expert
        return checkpoint.get(source, out_in[name])
    if name.startswith("b"):
        fused = checkpoint.get_expert(source, expert, (E, 2 * I) if name != "b2" else (E, H))  # [2I] or [H]
        return fused if name == "b2" else _split(fused, name, anatomy.interleaved)
    rows = 2 * I if name != "w2" else H  # the fused tensor's [out, in], before any transposition
    cols = H if name != "w2" else I
    if source.endswith("_blocks"):  # MXFP4, stored [out, in] whatever the model's in-memory orientation
        blocks = checkpoint.get_expert(source, expert, (E, rows, cols // 32, 16))
        scales = checkpoint.get_expert(_scales_of(source), expert, (E, rows, cols // 32))
        matrix = mxfp4_dequantize(blocks, scales)  # [out, in]
    elif anatomy.transposed:
        matrix = checkpoint.get_expert(source, expert, (E, cols, rows)).T  # [out, in]
    else:
        matrix = checkpoint.get_expert(source, expert, (E, rows, cols))
    return matrix.contiguous() if name == "w2" else _split(matrix, name, anatomy.interleaved)


def _split(gate_up: torch.Tensor, name: str, interleaved: bool) -> torch.Tensor:
    """Gate (w1/b1) or up (w3/b3) out of a fused [2I, ...] tensor: halves, or alternate rows when interleaved."""
    first = name in ("w1", "b1")
    if interleaved:
        return gate_up[0 if first else 1 :: 2].contiguous()
    half = gate_up.shape[0] // 2
    return (gate_up[:half] if first else gate_up[half:]).contiguous()
