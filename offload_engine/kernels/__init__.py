"""Quantized matmul kernels: one entry point, `kernels.linear(x, layout, buffer)` (y = x @ W.T), three backends.

  * `reference`: hqq's dequantize into a full matrix, then F.linear. Simple, any layout, any device; the
    correctness reference for the others, and the fallback.
  * `fused-cpu`: a C++ GEMV built with the system's g++ for this CPU (cpu.py, cpu_kernel.cpp) that dequantizes
    in vector registers in one pass over the packed bytes; long prefills dequantize in one pass and use BLAS.
  * `fused-triton`: Triton GEMV / tiled tl.dot / one-pass dequantize kernels for CUDA (triton_kernels.py).

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


def _fused_for(device: torch.device) -> tuple[Kernels | None, str | None]:
    """The fused backend for `device`, or (None, why not)."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return None, "triton is not installed (pip install triton)"
        from .triton_kernels import TritonKernels

        return TritonKernels(), None
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


GEMV_BLOCK_N, GEMV_BLOCK_K = 32, 128  # rows per program, weights along K per step (Triton GEMV)


def gemv_k_splits(out_features: int, in_features: int, group_size: int, sms: int) -> int:
    """How many K slices the Triton GEMV splits a matrix into: enough programs to give each SM ~4, never slicing
    K thinner than one step. (Pure arithmetic, shared by the launcher and the throughput model.)"""
    row_blocks = -(-out_features // GEMV_BLOCK_N)
    steps = -(-(in_features // group_size) // max(1, GEMV_BLOCK_K // group_size))
    return max(1, min(-(-4 * sms // row_blocks), steps))


def fused_traffic(layout: MatrixLayout, tokens: int = 1, sms: int = 40) -> int:
    """Device-memory bytes one fused GEMV moves on a GPU with `sms` SMs: the packed matrix once, x and y per
    token, and the fp32 partial sums of a split-K launch (written, then read back by the reduction)."""
    out_features, in_features = layout.shape
    activations = tokens * (in_features + out_features) * layout.dtype.itemsize
    splits = gemv_k_splits(out_features, in_features, layout.spec.group_size, sms) if layout.spec.bits else 1
    partials = 2 * splits * tokens * out_features * 4 if splits > 1 else 0
    return layout.nbytes + activations + partials
