"""Packed experts: one routed expert (gate w1, up w3, down w2, optional biases, all quantization metadata) in one
byte buffer.

A buffer is all an expert is: the expert cache copies buffers between pinned host memory and device slots
with one copy each, and `expert_forward` runs the expert straight from whichever buffer holds it. Every family
stores gate and up as two separate [I, H] matrices here, whatever its checkpoint does (concatenated,
interleaved, transposed, MXFP4): the checkpoint readers undo that before packing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .config import QuantSpec
from .kernels import REFERENCE, Kernels
from .quantize import MatrixLayout, Segment, dequantize, quantize_into

MATRICES = ("w1", "w3", "w2")  # gate, up, down (Mixtral's names on disk)
BIASES = ("b1", "b3", "b2")  # their biases (GPT-OSS), kept in the model dtype


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def gpt_oss_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's gated unit: both halves clamped to +-limit (gate from above only), sigmoid(alpha x), up + 1."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


ACTIVATIONS: dict[str, Callable[..., torch.Tensor]] = {"swiglu": swiglu, "gpt_oss": gpt_oss_swiglu}


@dataclass(frozen=True)
class ExpertLayout:
    hidden_size: int
    intermediate_size: int
    spec: QuantSpec
    dtype: torch.dtype
    matrices: dict[str, MatrixLayout]
    nbytes: int
    biases: dict[str, Segment] = field(default_factory=dict)  # b1 [I], b3 [I], b2 [H] when the family has them
    activation: str = "swiglu"
    act_params: tuple[float, ...] = ()  # extra arguments of the activation (GPT-OSS: alpha, limit)

    @staticmethod
    def build(hidden_size: int, intermediate_size: int, spec: QuantSpec, dtype: torch.dtype, bias: bool = False,
              activation: str = "swiglu", act_params: tuple[float, ...] = ()) -> "ExpertLayout":
        shapes = {"w1": (intermediate_size, hidden_size), "w3": (intermediate_size, hidden_size),
                  "w2": (hidden_size, intermediate_size)}
        matrices, offset = {}, 0
        for name in MATRICES:
            matrices[name] = MatrixLayout.build(shapes[name], spec, dtype, offset)
            offset += matrices[name].nbytes
        biases = {}
        if bias:
            for name, size in zip(BIASES, (intermediate_size, intermediate_size, hidden_size)):
                biases[name] = Segment(name, dtype, (size,), offset)
                offset += -(-biases[name].nbytes // 16) * 16  # 16-byte aligned, like the matrices' segments
        return ExpertLayout(hidden_size, intermediate_size, spec, dtype, matrices, offset, biases, activation,
                            tuple(act_params))

    @property
    def names(self) -> tuple[str, ...]:
        """The tensors an expert is packed from: w1, w3, w2 and, with biases, b1, b3, b2."""
        return MATRICES + tuple(self.biases)

    def pack(self, weights: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        """Quantize an expert's full-precision matrices (and copy its biases) into `out` (uint8, `nbytes`)."""
        for name in MATRICES:
            quantize_into(weights[name], self.matrices[name], out)
        for name, segment in self.biases.items():
            segment.view(out).copy_(weights[name])

    def region(self, name: str) -> tuple[int, int]:
        """(first byte, byte count) of one matrix or bias within the packed expert."""
        part = self.matrices.get(name) or self.biases[name]
        return (part.start if name in self.matrices else part.offset), part.nbytes

    def weight(self, buffer: torch.Tensor, name: str) -> torch.Tensor:
        layout = self.matrices[name]
        return dequantize(layout, layout.views(buffer))

    def describe(self) -> dict:
        """The byte layout as plain data (written into pre-quantized checkpoints' manifests)."""
        described = {name: [s.describe() for s in m.segments] for name, m in self.matrices.items()}
        return described | {name: [s.describe()] for name, s in self.biases.items()}


def expert_forward(layout: ExpertLayout, buffer: torch.Tensor, x: torch.Tensor,
                   kernels: Kernels | None = None) -> torch.Tensor:
    """Gated expert: w2(act(w1 x + b1, w3 x + b3)) + b2, straight from the packed `buffer`.  x: [T, H] -> [T, H].

    `kernels` (offload_engine.kernels) runs each quantized matmul; None means the reference kernels."""
    kernels = kernels or REFERENCE
    bias = {name: segment.view(buffer) for name, segment in layout.biases.items()}
    gate = kernels.linear(x, layout.matrices["w1"], buffer)  # [T, I]
    up = kernels.linear(x, layout.matrices["w3"], buffer)  # [T, I]
    if bias:
        gate, up = gate + bias["b1"], up + bias["b3"]
    hidden = ACTIVATIONS[layout.activation](gate, up, *layout.act_params)  # [T, I]
    out = kernels.linear(hidden, layout.matrices["w2"], buffer)  # [T, H]
    return out + bias["b2"] if bias else out
