"""CPU kernels: `torch.compile` (inductor's C++ backend) of the group-sum formulation.

For a [N, K] matrix in groups of g along K, with codes q, scales s and zeros z per group (w = (q - z) * s):

    y[t, n] = sum_G s[n, G] * ( sum_{k in G} q[n, k] x[t, k]  -  z[n, G] * X[t, G] ),   X[t, G] = sum_{k in G} x[t, k]

Written with broadcast torch ops, inductor turns it into one C++ loop nest that reads each packed byte once and
never materialises the weight matrix. Each weight costs a shift, a mask, a convert and a multiply-add.

That GEMV re-reads the codes for every token, so above `GEMV_MAX_TOKENS` tokens (prefill) a compiled one-pass
dequantize into a full matrix followed by a BLAS matmul wins. Both are compiled once per matrix format; the token
count is dynamic (dynamo compiles T = 1 and then one kernel for any other T).
"""

from __future__ import annotations

import functools
import shutil
import warnings

import torch
import torch.nn.functional as F

from ..quantize import MatrixLayout
from .packing import PackedFormat, scales_and_zeros, unpack_codes

# Inductor warns when a kernel reads float16 scale ranges and writes bfloat16: intended here (see packing.py).
warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node")

GEMV_MAX_TOKENS = 4  # measured on 2 cores (scripts/bench_kernels.py): beyond this, dequantize + matmul is faster


def _gemv(fmt: PackedFormat, dtype: torch.dtype, x: torch.Tensor, views: dict[str, torch.Tensor]) -> torch.Tensor:
    """x [T, K] -> [T, N] in `dtype`, reading only the packed codes and the 8/16-bit scale and zero codes."""
    G, g = fmt.groups_per_row, fmt.group_size
    q = unpack_codes(views["codes"], fmt).float()  # [N, G, g], fused into the loop below by inductor
    scale, zero = scales_and_zeros(views, fmt, dtype)  # [N, G]
    xg = x.float().view(-1, 1, G, g)  # [T, 1, G, g]
    partial = (q[None] * xg).sum(-1)  # [T, N, G]
    return (scale * (partial - zero * xg.sum(-1))).sum(-1).to(dtype)  # [T, N]


def _dequantize(fmt: PackedFormat, dtype: torch.dtype, views: dict[str, torch.Tensor]) -> torch.Tensor:
    """The full [N, K] matrix in `dtype`, in one pass over the packed bytes."""
    q = unpack_codes(views["codes"], fmt).float()  # [N, G, g]
    scale, zero = scales_and_zeros(views, fmt, dtype)  # [N, G]
    return ((q - zero[..., None]) * scale[..., None]).view(fmt.out_features, fmt.in_features).to(dtype)


@functools.cache
def compiler_problem() -> str | None:
    """Why inductor's C++ backend cannot work here (None if it can): it needs a C++ compiler on the PATH."""
    from torch._inductor import config as inductor_config

    compiler = inductor_config.cpp.cxx[0] if inductor_config.cpp.cxx and inductor_config.cpp.cxx[0] else "g++"
    if shutil.which(compiler) is None and shutil.which("g++") is None and shutil.which("clang++") is None:
        return f"no C++ compiler ({compiler}, g++ or clang++) on the PATH"
    return None


class CompiledCPUKernels:
    """Quantized matmuls for CPU tensors, compiled per (matrix format, compute dtype) on first use."""

    name = "fused-cpu"

    def __init__(self) -> None:
        # Every matrix shape of a model is a distinct specialisation of the same two functions; a model has a
        # handful (Mixtral: 4 attention/expert shapes x 2 token-count kernels), so raise dynamo's per-function cap.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 1024)
        self._gemv = torch.compile(_gemv, dynamic=None)
        self._dequantize = torch.compile(_dequantize, dynamic=False)

    def supports(self, layout: MatrixLayout) -> str | None:
        """None if this layout runs fused, else why not."""
        if layout.spec.bits is None:
            return "not quantized"
        try:
            PackedFormat.of(layout)
        except ValueError as e:
            return str(e)
        return None

    def linear(self, x: torch.Tensor, layout: MatrixLayout, buffer: torch.Tensor) -> torch.Tensor:
        """y = x @ W.T for W in `layout` within `buffer`.  x: [T, K] -> [T, N]."""
        views = layout.views(buffer)
        if layout.spec.bits is None:
            return F.linear(x, views["weight"])
        fmt = PackedFormat.of(layout)
        if x.shape[0] <= GEMV_MAX_TOKENS:
            return self._gemv(fmt, layout.dtype, x.contiguous(), views)
        return F.linear(x, self._dequantize(fmt, layout.dtype, views))

    def warm_up(self, layout: MatrixLayout, device: torch.device) -> None:
        """Compile every kernel `layout` will use, so the first reply does not stall on the compiler."""
        buffer = torch.zeros(layout.start + layout.nbytes, dtype=torch.uint8, device=device)
        for tokens in (1, 2, GEMV_MAX_TOKENS + 1):
            self.linear(torch.zeros(tokens, layout.shape[1], dtype=layout.dtype, device=device), layout, buffer)


@functools.cache
def shared_cpu_kernels() -> CompiledCPUKernels:
    """One instance per process: compiled kernels are cached per function, so engines share them."""
    return CompiledCPUKernels()
