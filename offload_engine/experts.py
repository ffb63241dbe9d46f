"""Packed experts: one Mixtral expert (w1, w3, w2 with all their quantization metadata) in one byte buffer.

A buffer is all an expert is: the expert cache copies buffers between pinned host memory and device slots
with one copy each, and `expert_forward` runs the expert straight from whichever buffer holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import QuantSpec
from .kernels import REFERENCE, Kernels
from .quantize import MatrixLayout, dequantize, quantize_into

MATRICES = ("w1", "w3", "w2")  # gate, up, down: the names the checkpoints use on disk


@dataclass(frozen=True)
class ExpertLayout:
    hidden_size: int
    intermediate_size: int
    spec: QuantSpec
    dtype: torch.dtype
    matrices: dict[str, MatrixLayout]
    nbytes: int

    @staticmethod
    def build(hidden_size: int, intermediate_size: int, spec: QuantSpec, dtype: torch.dtype) -> "ExpertLayout":
        shapes = {"w1": (intermediate_size, hidden_size), "w3": (intermediate_size, hidden_size),
                  "w2": (hidden_size, intermediate_size)}
        matrices, offset = {}, 0
        for name in MATRICES:
            matrices[name] = MatrixLayout.build(shapes[name], spec, dtype, offset)
            offset += matrices[name].nbytes
        return ExpertLayout(hidden_size, intermediate_size, spec, dtype, matrices, offset)

    def pack(self, weights: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        """Quantize an expert's three full-precision matrices into `out` (a uint8 buffer of `nbytes`)."""
        for name in MATRICES:
            quantize_into(weights[name], self.matrices[name], out)

    def weight(self, buffer: torch.Tensor, name: str) -> torch.Tensor:
        layout = self.matrices[name]
        return dequantize(layout, layout.views(buffer))

    def describe(self) -> dict:
        """The byte layout as plain data (written into pre-quantized checkpoints' manifests)."""
        return {
            name: [{"name": s.name, "dtype": str(s.dtype).removeprefix("torch."), "shape": list(s.shape),
                    "offset": s.offset, "nbytes": s.nbytes} for s in m.segments]
            for name, m in self.matrices.items()
        }


def expert_forward(layout: ExpertLayout, buffer: torch.Tensor, x: torch.Tensor,
                   kernels: Kernels | None = None) -> torch.Tensor:
    """SwiGLU expert: w2(silu(w1 x) * w3 x), straight from the packed `buffer`.  x: [T, H] -> [T, H].

    `kernels` (offload_engine.kernels) runs each quantized matmul; None means the reference kernels."""
    kernels = kernels or REFERENCE
    gate = kernels.linear(x, layout.matrices["w1"], buffer)  # [T, I]
    up = kernels.linear(x, layout.matrices["w3"], buffer)  # [T, I]
    return kernels.linear(F.silu(gate) * up, layout.matrices["w2"], buffer)  # [T, H]
