"""Quantized matmul kernels: one entry point, `kernels.linear(x, layout, buffer)` (y = x @ W.T), three backends.

  * `reference`: hqq's dequantize into a full matrix, then F.linear. Simple, any layout, any device; the
    correctness reference for the others, and the fallback.
  * `fused-cpu`: a C++ GEMV built with the system's g++ for this CPU (cpu.py, cpu_kernel.cpp) that dequantizes
    in vector registers in one pass over the packed bytes; long prefills dequantize in one pass and use BLAS.
  * `fused-triton`: Triton GEMV / tiled tl.dot / one-pass dequantize kernels for CUDA (triton_kernels.py; their
    tiling, and the bytes each program loads, as arithmetic in geometry.py).

The config key `kernels: auto | fused | reference` picks: `auto` takes the fused backend for the device when it
can run here and the reference otherwise (with one warning saying why); `fused` insists, failing at load time.
Experts and quantized attention both go through the backend chosen; a matrix the fused backend cannot read
(`supports()` says why) is an error at load time under `fused` and runs on the reference under `auto`.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from typing import Iterable, Protocol

import torch
import torch.nn.functional as F

from ..config import KERNEL_CHOICES, ConfigError
from ..quantize import MatrixLayout, dequantize
from .capability import bfloat16_problem  # noqa: F401  (public here: the loader, tests)
from .geometry import kernel_bytes, plan_launch
from .packing import PackedFormat


class Kernels(Protocol):
    name: str

    def linear(self, x: torch.Tensor, layout: MatrixLayout, buffer: torch.Tensor) -> torch.Tensor: ...

    def supports(self, layout: MatrixLayout) -> str | None: ...

    def warm_up(self, layout: MatrixLayout, device: torch.device) -> None: ...


class ReferenceKernels:
    """Dequantize the whole matrix (hqq's torch ops), then F.linear: the path every fused kernel is checked against."""

    name = "reference"

    def linear(self, x: torch.Tensor, layout: MatrixLayout, buffer: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(layout, layout.views(buffer)))  # [T, K] -> [T, N]

    def supports(self, layout: MatrixLayout) -> str | None:
        return None

    def warm_up(self, layout: MatrixLayout, device: torch.device) -> None:
        pass


REFERENCE = ReferenceKernels()


class QuantLinear(torch.nn.Module):
    """A linear layer whose weight lives in a packed buffer (a `MatrixLayout`), multiplied by `kernels`; an
    optional bias stays in the model dtype."""

    def __init__(self, layout: MatrixLayout, buffer: torch.Tensor, kernels: Kernels,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.layout, self.kernels = layout, kernels
        self.register_buffer("packed", buffer)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = layout.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernels.linear(x.reshape(-1, self.in_features), self.layout, self.packed)  # [tokens, out]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class MixedKernels:
    """The fused backend for the layouts it supports and the reference for the rest (`auto` only)."""

    def __init__(self, fused: Kernels, fallback_layouts: set[MatrixLayout]):
        self.fused, self.fallback = fused, fallback_layouts
        self.name = f"{fused.name} (+reference for {len(fallback_layouts)} matrix shapes)"

    def linear(self, x: torch.Tensor, layout: MatrixLayout, buffer: torch.Tensor) -> torch.Tensor:
        return (REFERENCE if layout in self.fallback else self.fused).linear(x, layout, buffer)

    def supports(self, layout: MatrixLayout) -> str | None:
        return None

    def warm_up(self, layout: MatrixLayout, device: torch.device) -> None:
        if layout not in self.fallback:
            self.fused.warm_up(layout, device)


# bfloat16 arithmetic arrived with Ampere. Below it Triton emulates every bf16 conversion in integer code (3.9
# does; older releases' ptxas rejected them for sm_75) and tl.dot gets no tensor cores, while float16 runs natively.
def _fused_for(device: torch.device) -> tuple[Kernels | None, str | None]:
    """The fused backend for `device`, or (None, why not)."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return None, "triton is not installed (pip install triton)"
        from .triton_kernels import TritonKernels

        return TritonKernels(device), None
    if device.type == "cpu":
        from .cpu import compiler_problem, shared_cpu_kernels

        problem = compiler_problem()
        return (None, problem) if problem else (shared_cpu_kernels(), None)
    return None, f"no fused kernels for device type {device.type!r}"


def select_kernels(choice: str, device: torch.device, layouts: Iterable[MatrixLayout] = ()) -> Kernels:
    """The backend for config value `choice` on `device`, able to run every quantized layout in `layouts`."""
    if choice not in KERNEL_CHOICES:
        raise ConfigError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")
    quantized = {layout for layout in layouts if layout.spec.bits is not None}
    if choice == "reference" or not quantized:
        return REFERENCE
    fused, why_not = _fused_for(torch.device(device))
    if fused is None:
        if choice == "fused":
            raise ConfigError(f"kernels: fused is not available on {device}: {why_not}; use kernels: auto or reference")
        warnings.warn(f"fused kernels unavailable on {device} ({why_not}); using the reference kernels "
                      "(dequantize + matmul), which are several times slower", RuntimeWarning, stacklevel=2)
        return REFERENCE
    unsupported = {layout: fused.supports(layout) for layout in quantized}
    unsupported = {layout: why for layout, why in unsupported.items() if why}
    if not unsupported:
        return fused
    if choice == "fused":
        raise ConfigError(f"kernels: fused cannot run this model: {next(iter(unsupported.values()))}")
    warnings.warn(f"{len(unsupported)} matrix shape(s) run on the reference kernels: "
                  f"{next(iter(unsupported.values()))}", RuntimeWarning, stacklevel=2)
    return MixedKernels(fused, set(unsupported))


def warm_up(kernels: Kernels, layouts: Iterable[MatrixLayout], device: torch.device) -> float:
    """Compile every kernel the given layouts use now, not during the first reply; returns the seconds it took."""
    start = time.perf_counter()
    with torch.inference_mode():  # as forwards run
        for layout in dict.fromkeys(layout for layout in layouts if layout.spec.bits is not None):
            kernels.warm_up(layout, device)
    return time.perf_counter() - start


def fused_traffic(layout: MatrixLayout, tokens: int = 1, sms: int = 40) -> int:
    """Device-memory bytes one fused matmul of `tokens` tokens moves on a GPU with `sms` SMs, from what the Triton
    kernels load and store (geometry.kernel_bytes, derived from their index arithmetic): the matrix's bytes as the
    programs load them (a word that several programs load is read that many times: their loads are too far apart
    for L2 to serve), x and the zero range once (every program reads them; L2 serves the repeats), every store
    and the split-K partial sums read back; after `dequantize`, cuBLAS reading the matrix and x and writing y."""
    out_features, in_features = layout.shape
    itemsize = layout.dtype.itemsize
    activations = tokens * (in_features + out_features) * itemsize
    if layout.spec.bits is None:
        return layout.nbytes + activations
    fmt = PackedFormat.of(layout)
    counted = kernel_bytes(fmt, itemsize, tokens, sms)
    once = {"x": tokens * in_features * itemsize, "zero_range": 8 if fmt.quant_meta else 0}
    total = sum(n for name, n in counted.loads.items() if name not in once) + sum(once.values())
    total += sum(counted.stores.values())
    if plan_launch(fmt, tokens, sms).kernel == "dequantize":
        total += out_features * in_features * itemsize + activations
    return total
