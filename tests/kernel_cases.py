"""Matrices in the engine's byte layout for kernel tests, and the error bound a fused kernel must meet.

Kernels must be right for any bytes a layout can hold, so most cases fill the codes with random bytes and the
scale/zero codes with random values in sane ranges (hqq's optimiser is not what is tested, and it takes ~20 s
for one Mixtral-sized matrix); one case per test file quantizes a real matrix with hqq as well.
"""

from __future__ import annotations

import torch

from offload_engine.config import QuantSpec
from offload_engine.quantize import MatrixLayout, dequantize

# (bits, group_size, quant_meta): every accepted bit width, common group sizes, both scale/zero formats
FORMATS = [(1, 32, True), (2, 16, True), (2, 16, False), (2, 64, True), (3, 16, True), (3, 64, False),
           (4, 64, True), (4, 128, False), (8, 32, True), (8, 16, False)]
# (out, in): sizes no block divides, a single group per row, and out not a multiple of the codes per word (2/4-bit
# rows then do not share words: the CPU kernel's unaligned path)
AWKWARD_SHAPES = [(100, 48), (40, 16), (24, 160), (98, 32), (102, 64), (99, 32)]


def random_packed(layout: MatrixLayout, seed: int = 0) -> torch.Tensor:
    """A buffer holding random but valid codes, scales and zeros for `layout` (starting at its offset)."""
    gen = torch.Generator().manual_seed(seed)
    buffer = torch.randint(0, 256, (layout.start + layout.nbytes,), dtype=torch.uint8, generator=gen)
    views = layout.views(buffer)
    levels = 2**layout.spec.bits - 1
    if "codes" in views and views["codes"].dtype == torch.int32:  # 3-bit: 10 codes of 3 bits in bits 0..29
        views["codes"].copy_(torch.randint(0, 2**30, views["codes"].shape, generator=gen, dtype=torch.int32))
    if layout.spec.quant_meta:
        ranges = views["scale_range"]
        ranges[:, 0] = (torch.rand(ranges.shape[0], generator=gen) * 0.02 + 0.005).half()  # min scale
        ranges[:, 1] = (torch.rand(ranges.shape[0], generator=gen) * 2e-4).half()  # step
        views["zero_range"].copy_(torch.tensor([-0.5, (levels + 1) / 255.0]))
    else:
        views["scale"].copy_(torch.rand(views["scale"].shape, generator=gen) * 0.02 + 0.005)
        views["zero"].copy_(torch.rand(views["zero"].shape, generator=gen) * levels)
    return buffer


def layout_for(shape: tuple[int, int], bits: int, group_size: int, quant_meta: bool,
               dtype: torch.dtype, offset: int = 0) -> MatrixLayout:
    return MatrixLayout.build(shape, QuantSpec(bits, group_size, quant_meta=quant_meta), dtype, offset)


def exact_product(x: torch.Tensor, layout: MatrixLayout, buffer: torch.Tensor) -> torch.Tensor:
    """x @ W.T in float64, W dequantized by hqq in float32: what every kernel approximates."""
    f32 = MatrixLayout(layout.shape, layout.spec, torch.float32, layout.segments, layout.nbytes)
    return x.double() @ dequantize(f32, f32.views(buffer)).double().T


def assert_close_to_reference(got: torch.Tensor, x: torch.Tensor, layout: MatrixLayout, buffer: torch.Tensor) -> None:
    """fp32: within 1e-5 of the reference relative to the output's scale. Half precision: no further from the
    exact product than the reference's own rounding (plus one unit of the output dtype's rounding)."""
    reference = torch.nn.functional.linear(x, dequantize(layout, layout.views(buffer)))
    assert got.shape == reference.shape and got.dtype == reference.dtype
    scale = reference.double().abs().max().item() + 1e-12
    if layout.dtype == torch.float32:
        err = (got.double() - reference.double()).abs().max().item() / scale
        assert err < 1e-5, f"relative error {err:.2e} vs the reference"
        return
    exact = exact_product(x, layout, buffer)
    ours = (got.double() - exact).abs().max().item() / scale
    theirs = (reference.double() - exact).abs().max().item() / scale
    eps = torch.finfo(layout.dtype).eps
    assert ours <= 2 * theirs + eps, f"error {ours:.2e} vs the reference's own {theirs:.2e} (eps {eps:.1e})"
