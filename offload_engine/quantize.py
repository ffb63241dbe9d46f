"""HQQ quantization of one weight matrix, with 8-bit scales and zeros, as a flat byte layout.

hqq's `Quantizer` finds the low-bit codes, scales and zeros (half-quadratic optimisation) and packs the codes;
that is what it does well and we use it as is. hqq >= 0.2 stores scales and zeros in 16 bits, which at
2-bit group-16 costs 2 extra bits per weight, so we compress them ourselves the way the reference system did:
  * scales: 8-bit min-max codes, one (min, step) pair in float16 per group of 128 scales;
  * zeros:  8-bit min-max codes with one (min, step) pair per matrix (they live in [0, 2^bits - 1] give or take
    the optimiser's drift, so one range covers them).
A 2-bit group-16 matrix then costs 2 + 8/16 + 8/16 + 32/(16*128) = 3.016 bits per weight.

Everything a matrix needs lives in named segments of one uint8 buffer (`MatrixLayout`), so a packed expert
(experts.py) is a concatenation of three such layouts and moves between host and device in one copy.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
from hqq.core.quantize import Quantizer

from .config import QuantSpec

SCALE_GROUP = 128  # scales sharing one 8-bit range
ALIGN = 16  # every segment starts at a multiple of this, so it can be viewed as any dtype


class QuantizationError(ValueError):
    pass


@dataclass(frozen=True)
class Segment:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        """This segment of a flat uint8 buffer, as a typed tensor (no copy)."""
        return buffer[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)

    def describe(self) -> dict:
        """As plain data (pre-quantized checkpoints' manifests record every byte layout)."""
        return {"name": self.name, "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape),
                "offset": self.offset, "nbytes": self.nbytes}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class MatrixLayout:
    """Byte layout of one [out, in] matrix, quantized (`spec.bits` set) or stored as is in `dtype`."""

    shape: tuple[int, int]
    spec: QuantSpec
    dtype: torch.dtype  # the compute dtype; also the storage dtype when unquantized
    segments: tuple[Segment, ...]
    nbytes: int

    @staticmethod
    def build(shape: tuple[int, int], spec: QuantSpec, dtype: torch.dtype, offset: int = 0) -> "MatrixLayout":
        """Compute the layout from shapes alone (nothing is allocated), starting at byte `offset`."""
        out_features, in_features = shape
        if spec.bits is None:
            parts = [("weight", dtype, (out_features, in_features))]
        else:
            numel, g = out_features * in_features, spec.group_size
            if numel % g:
                raise QuantizationError(f"group_size {g} does not divide a matrix of shape {shape}")
            n_groups = numel // g
            per_byte = {1: 8, 2: 4, 4: 2, 8: 1}.get(spec.bits)
            if per_byte and n_groups % per_byte:
                raise QuantizationError(
                    f"{spec.bits}-bit packing needs the number of groups ({n_groups} for shape {shape}, "
                    f"group_size {g}) to be a multiple of {per_byte}; choose another group_size"
                )
            # hqq packs codes along the group axis; a meta tensor gives the packed shape without allocating.
            packing = Quantizer.bit_to_packing[spec.bits]
            packed = Quantizer.pack[packing](torch.empty(n_groups, g, dtype=torch.uint8, device="meta"))
            n_scale_groups = -(-n_groups // SCALE_GROUP)
            parts = [("codes", packed.dtype, tuple(packed.shape))]
            if spec.quant_meta:
                parts += [
                    ("scale_q", torch.uint8, (n_scale_groups * SCALE_GROUP,)),
                    ("scale_range", torch.float16, (n_scale_groups, 2)),  # (min, step) per group of scales
                    ("zero_q", torch.uint8, (n_groups,)),
                    ("zero_range", torch.float32, (2,)),  # (min, step) for the whole matrix
                ]
            else:  # hqq's own format: 16-bit scales and zeros
                parts += [("scale", torch.float16, (n_groups,)), ("zero", torch.float16, (n_groups,))]
        segments = []
        for name, seg_dtype, seg_shape in parts:
            seg = Segment(name, seg_dtype, seg_shape, offset)
            segments.append(seg)
            offset = _align(offset + seg.nbytes)
        start = segments[0].offset
        return MatrixLayout(tuple(shape), spec, dtype, tuple(segments), offset - start)

    @property
    def start(self) -> int:
        return self.segments[0].offset

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        return {s.name: s.view(buffer) for s in self.segments}

    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])


def _minmax_codes(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit min-max quantization of `x` in `groups` equal groups: (codes uint8, [groups, 2] (min, step))."""
    x = x.float().reshape(groups, -1)
    lo, hi = x.min(dim=1).values, x.max(dim=1).values
    step = (hi - lo) / 255
    step = torch.where(step > 0, step, torch.ones_like(step))  # a constant group: any step reproduces it
    codes = ((x - lo[:, None]) / step[:, None]).round_().clamp_(0, 255).to(torch.uint8)
    return codes.reshape(-1), torch.stack([lo, step], dim=1)


def quantize_into(weight: torch.Tensor, layout: MatrixLayout, buffer: torch.Tensor) -> None:
    """Quantize `weight` [out, in] with hqq and write it into `buffer` at `layout`'s segments."""
    if tuple(weight.shape) != layout.shape:
        raise QuantizationError(f"weight of shape {tuple(weight.shape)} does not match layout {layout.shape}")
    views = layout.views(buffer)
    spec = layout.spec
    if spec.bits is None:
        views["weight"].copy_(weight)
        return
    codes, meta = Quantizer.quantize(
        weight.float(), nbits=spec.bits, group_size=spec.group_size, axis=1, optimize=spec.optimize,
        bitpack=True, compute_dtype=torch.float32, device=str(weight.device),
    )
    views["codes"].copy_(codes)
    scale = meta["scale"].reshape(-1)  # [groups]
    zero = meta["zero"].reshape(-1)  # [groups]
    if not spec.quant_meta:
        views["scale"].copy_(scale)
        views["zero"].copy_(zero)
        return
    # Pad the scales to whole groups of SCALE_GROUP by repeating the last one (keeps each group's range tight).
    padded = torch.cat([scale, scale[-1:].expand(views["scale_q"].numel() - scale.numel())])
    scale_q, scale_range = _minmax_codes(padded, views["scale_range"].shape[0])
    views["scale_q"].copy_(scale_q)
    views["scale_range"].copy_(scale_range.to(torch.float16))
    zero_q, zero_range = _minmax_codes(zero, 1)
    views["zero_q"].copy_(zero_q)
    views["zero_range"].copy_(zero_range.reshape(2))


def dequantize(layout: MatrixLayout, views: dict[str, torch.Tensor]) -> torch.Tensor:
    """The [out, in] matrix in the compute dtype, rebuilt from a layout's segment views (on any device)."""
    if layout.spec.bits is None:
        return views["weight"]
    dtype = layout.dtype
    if layout.spec.quant_meta:
        n_groups = views["zero_q"].numel()
        # Rebuild scales and zeros in float32 (they are few), then cast: bfloat16 would round them visibly.
        scale_range = views["scale_range"].float()  # [scale groups, 2]
        scale = views["scale_q"].view(scale_range.shape[0], -1).float() * scale_range[:, 1:] + scale_range[:, :1]
        zero_range = views["zero_range"]
        zero = views["zero_q"].to(torch.float32) * zero_range[1] + zero_range[0]
    else:
        scale, zero = views["scale"].float(), views["zero"].float()
        n_groups = zero.numel()
    meta = {
        "nbits": layout.spec.bits, "group_size": layout.spec.group_size, "shape": layout.shape, "axis": 1,
        "packing": Quantizer.bit_to_packing[layout.spec.bits], "view_as_float": False, "compute_dtype": dtype,
        "scale": scale.reshape(-1)[:n_groups, None].to(dtype), "zero": zero[:, None].to(dtype),
    }
    return Quantizer.dequantize(views["codes"], meta)


def quantize_matrix(weight: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> tuple[MatrixLayout, torch.Tensor]:
    """Quantize one matrix into a fresh buffer of its own (used for attention and in tests)."""
    layout = MatrixLayout.build(tuple(weight.shape), spec, dtype)
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8, device=weight.device)
    quantize_into(weight, layout, buffer)
    return layout, buffer


def round_to_nearest(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Plain min-max round-to-nearest with 16-bit scales/zeros: the baseline HQQ must beat (tests, benchmarks)."""
    w = weight.float().reshape(-1, group_size)
    lo, hi = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    q = ((w - lo) / scale).round().clamp(0, 2**bits - 1)
    return (q * scale + lo).reshape(weight.shape).to(weight.dtype)
