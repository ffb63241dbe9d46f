"""The CPU kernel's integer-activation GEMV (kernels/cpu_kernel_int.h, `CPUKernels(int_activations=...)`) against
the exact product, the reference (dequantize + F.linear) and the float paths, in every activation dtype and in the
builds for CPUs without VNNI and without AVX-512.

The error bound is the one quantizing x implies: x_j is replaced by xs * round(x_j / xs), xs = max |x| / QMAX over
its 16 inputs (QMAX = 32767 for int16, 127 for int8), so each output moves by at most sum_j |w_j| * xs_j / 2 (plus
fp32 arithmetic, 1e-5 of sum_j |w_j x_j|) before its rounding to the output dtype. The kernel computes the same
fp32 value for any activation dtype (x converted exactly, scales and zeros in fp32), so a float16 or bfloat16
output must be exactly the float32 run's output rounded: the bound is checked on that float32 value.
"""

from __future__ import annotations

import platform

import pytest
import torch
from kernel_cases import assert_close_to_reference, exact_product, layout_for, random_packed

import offload_engine.kernels.cpu as cpu_kernels
from offload_engine.kernels.cpu import GEMV_MAX_TOKENS, CPUKernels, compiler_problem
from offload_engine.quantize import MatrixLayout, dequantize

pytestmark = [pytest.mark.skipif(compiler_problem() is not None, reason=f"no C++ compiler: {compiler_problem()}"),
              pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                 reason="the integer path is written for AVX2 and AVX-512")]

INT16, INT8 = "int16 dot products (x quantized per 16 inputs)", "int8 dot products (x quantized per 16 inputs)"
QMAX = {"int16": 32767, "int8": 127}
# (bits, group_size, quant_meta): every byte-code width in groups of 16-128 (the integer path), and 3-bit codes
# (10 per 32-bit word), which stay on the fp32 path
INT_FORMATS = [(1, 16, True), (1, 32, True), (2, 16, True), (2, 16, False), (2, 32, True), (2, 64, True),
               (2, 128, False), (4, 16, True), (4, 64, True), (4, 128, False), (8, 16, False), (8, 32, True)]
FLOAT_ONLY_FORMATS = [(3, 16, True), (3, 64, False)]


def _as_float32(layout: MatrixLayout) -> MatrixLayout:
    return MatrixLayout(layout.shape, layout.spec, torch.float32, layout.segments, layout.nbytes)


def _quantization_bound(x: torch.Tensor, layout: MatrixLayout, buffer: torch.Tensor, qmax: int) -> torch.Tensor:
    """[T, N]: sum_j |w_j| xs_j / 2 (x's rounding to integers) + 1e-5 sum_j |w_j x_j| (fp32 arithmetic)."""
    f32 = _as_float32(layout)
    weight = dequantize(f32, f32.views(buffer)).double().abs()  # [N, K]
    xd = x.double()
    step = xd.abs().view(x.shape[0], -1, 16).amax(-1, keepdim=True).expand(-1, -1, 16).reshape(x.shape) / qmax
    return (step / 2) @ weight.T * (1 + 1e-3) + 1e-5 * (xd.abs() @ weight.T)


def _shape_for(group_size: int) -> tuple[int, int]:
    """64 rows (a multiple of every PACK); ~21 subgroups of 16 inputs: one full block and a partial one (AVX-512:
    16 subgroups a block, AVX2: 8), whatever the group size."""
    return 64, -(-336 // group_size) * group_size


def _check_int_path(layout: MatrixLayout, buffer: torch.Tensor, mode: str, dtype: torch.dtype, tokens: int,
                    seed: int = 0) -> None:
    kernels = CPUKernels(int_activations=mode)
    x = (torch.randn(tokens, layout.shape[1], generator=torch.Generator().manual_seed(seed + tokens)) * 2).to(dtype)
    got = kernels.linear(x, layout, buffer)
    before_rounding = kernels.linear(x.float(), _as_float32(layout), buffer)  # the same fp32 value, unrounded
    assert got.dtype == dtype and got.shape == (tokens, layout.shape[0])
    assert torch.equal(got, before_rounding.to(dtype)), "the output is not the fp32 value rounded once to its dtype"
    exact = exact_product(x, layout, buffer)
    error = (before_rounding.double() - exact).abs()
    bound = _quantization_bound(x, layout, buffer, QMAX[mode])
    worst = (error / bound).max().item()
    assert worst <= 1, f"{mode}: error {worst:.2f}x the quantization bound"
    if dtype != torch.float32 and mode == "int16":
        # int16 rounds x 2^15 / 2^11 times finer than float16 does: before its output is rounded, no further from
        # the exact product than the reference is after all of its roundings (weights, products, output)
        reference = torch.nn.functional.linear(x, dequantize(layout, layout.views(buffer))).double()
        assert error.max() <= (reference - exact).abs().max()
        assert_close_to_reference(got, x, layout, buffer)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("mode", ["int16", "int8"])
@pytest.mark.parametrize("bits,group_size,quant_meta", INT_FORMATS)
def test_integer_activations_stay_within_the_bound_their_rounding_implies(bits, group_size, quant_meta, mode,
                                                                          dtype):
    layout = layout_for(_shape_for(group_size), bits, group_size, quant_meta, dtype, offset=32)
    buffer = random_packed(layout, seed=bits * 100 + group_size)
    expected = INT8 if mode == "int8" and (bits <= 4 or _vnni()) else INT16  # 8-bit codes need VNNI for int8
    assert CPUKernels(int_activations=mode).multiplies_in(layout) == expected
    for tokens in range(1, 9):  # token blocks of 1-4 (AVX-512) or 1-2 (AVX2), full and partial
        _check_int_path(layout, buffer, mode, dtype, tokens)


def _vnni() -> bool:
    with open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "").split()
    return "avx512_vnni" in flags and "avx512bw" in flags


@pytest.mark.parametrize("mode", ["int16", "int8"])
@pytest.mark.parametrize("group_size", [16, 32, 64])
def test_rows_that_start_a_scale_range(group_size, mode):
    """Rows of 3 x 128 groups start a (min, step) range each: at 1-2 tokens (3 with VNNI) their blocks read the
    scale codes with each range's (min, step) held through its blocks, not through ScaleReader (cpu_kernel_int.h),
    except those whose LANES scale codes would pass the row's end (in groups of 32 and 64)."""
    _check_rows_that_start_a_scale_range(group_size, mode)


def _check_rows_that_start_a_scale_range(group_size: int, mode: str) -> None:
    layout = layout_for((64, 3 * 128 * group_size), 2, group_size, True, torch.float16, offset=32)
    buffer = random_packed(layout, seed=group_size)
    for tokens in range(1, 5):  # 4 tokens: ScaleReader for every block
        _check_int_path(layout, buffer, mode, torch.float16, tokens)


@pytest.mark.parametrize("bits,group_size,quant_meta", FLOAT_ONLY_FORMATS)
def test_formats_the_integer_path_does_not_take_stay_on_the_float_path(bits, group_size, quant_meta):
    layout = layout_for(_shape_for(group_size), bits, group_size, quant_meta, torch.float16)
    buffer = random_packed(layout, seed=bits)
    for mode in ("int16", "int8", "auto"):
        kernels = CPUKernels(int_activations=mode)
        assert kernels.multiplies_in(layout) == "fp32"
        x = torch.randn(3, layout.shape[1], generator=torch.Generator().manual_seed(3)).half()
        assert_close_to_reference(kernels.linear(x, layout, buffer), x, layout, buffer)
    unshared = layout_for((102, 64), 2, 16, True, torch.float16)  # 102 % 4: rows do not share words
    assert CPUKernels(int_activations="int16").multiplies_in(unshared) == "fp32"
    buffer = random_packed(unshared, seed=5)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(2)).half()
    got = CPUKernels(int_activations="int16").linear(x, unshared, buffer)
    assert_close_to_reference(got, x, unshared, buffer)


def test_auto_quantizes_float16_always_bfloat16_but_on_the_reference_weights_path_and_float32_never():
    g16 = {dtype: layout_for((64, 256), 2, 16, True, dtype) for dtype in (torch.float16, torch.bfloat16,
                                                                          torch.float32)}
    g64 = layout_for((64, 256), 4, 64, True, torch.bfloat16)  # no bfloat16 dot-product path takes 4-bit g64
    two_bit_g64 = layout_for((64, 256), 2, 64, True, torch.bfloat16)  # on the reference's weights, if any
    auto, off = CPUKernels(), CPUKernels(int_activations="off")
    assert auto.int_activations == "auto" and cpu_kernels.shared_cpu_kernels().int_activations == "auto"
    assert auto.multiplies_in(g16[torch.float16]) == INT16
    assert auto.multiplies_in(g16[torch.float32]) == "fp32"
    assert auto.multiplies_in(g64) == INT16
    assert auto.multiplies_in(g16[torch.bfloat16]) == INT16  # on the codes (AVX512-BF16 + VBMI) or fp32 before
    assert off.multiplies_in(g16[torch.bfloat16]) in ("fp32", "bfloat16 dot products on the codes",
                                                      "bfloat16 dot products on the reference's weights")
    weights = off.multiplies_in(two_bit_g64)
    assert auto.multiplies_in(two_bit_g64) == (weights if weights.endswith("reference's weights") else INT16)
    assert off.multiplies_in(g16[torch.float16]) == "fp32"
    assert auto.multiplies_in(g16[torch.float16], tokens=GEMV_MAX_TOKENS + 1) == "fp32"  # dequantize + BLAS
    assert CPUKernels(int_activations="int8").multiplies_in(g16[torch.float32]) == INT8
    assert CPUKernels(fp32_only=True).multiplies_in(g16[torch.float16]) == "fp32"
    with pytest.raises(ValueError, match="int_activations must be one of"):
        CPUKernels(int_activations="int4")
    with pytest.raises(ValueError, match="contradicts"):
        CPUKernels(fp32_only=True, int_activations="int16")


def test_float16_by_default_matches_the_reference_as_closely_as_the_float_path_on_mixtral_shapes():
    """A Mixtral w2 (4096 x 14336, 896 subgroups a row) at 1 and 4 tokens: the default (int16) against the
    reference, as every half-precision kernel path is checked."""
    layout = layout_for((4096, 14336), 2, 16, True, torch.float16)
    buffer = random_packed(layout, seed=11)
    for tokens in (1, 4):
        x = torch.randn(tokens, 14336, generator=torch.Generator().manual_seed(tokens)).half()
        assert cpu_kernels.shared_cpu_kernels().multiplies_in(layout, tokens) == INT16
        assert_close_to_reference(cpu_kernels.shared_cpu_kernels().linear(x, layout, buffer), x, layout, buffer)


def test_an_input_of_zeros_and_huge_values_in_one_subgroup():
    """A subgroup of zeros has scale 0 (no division by it); one huge input only coarsens its own 16 inputs."""
    layout = layout_for((64, 256), 2, 16, True, torch.float16)
    buffer = random_packed(layout, seed=3)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(0)).half()
    x[0, :16] = 0
    x[1, 20] = 6e4  # near float16's largest
    for mode in ("int16", "int8"):
        _check_int_path(layout, buffer, mode, torch.float16, 2)
        got = CPUKernels(int_activations=mode).linear(x, layout, buffer)
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("extra_flags", ["-mno-avx512vnni", "-mno-avx512f"])
def test_the_integer_path_without_vnni_and_without_avx512(extra_flags, tmp_path, monkeypatch, fresh_build):
    """-mno-avx512vnni: AVX-512BW's vpmaddwd / vpmaddubsw instead of vpdpwssd / vpdpbusd (Skylake-X; int8 shifts
    the codes down, and 8-bit codes take int16); -mno-avx512f: the AVX2 code (8 lanes, its own transpose and lane
    order)."""
    with open("/proc/cpuinfo") as f:
        if "avx2" not in next((line for line in f if line.startswith("flags")), "").split():
            pytest.skip("no AVX2")
    monkeypatch.setenv("OFFLOAD_ENGINE_CXXFLAGS", extra_flags)
    monkeypatch.setenv("OFFLOAD_ENGINE_CACHE", str(tmp_path))
    for bits, group_size, quant_meta in [(2, 16, True), (1, 32, True), (4, 64, False), (8, 16, False),
                                         (2, 128, True)]:
        for dtype in (torch.float16, torch.bfloat16):
            layout = layout_for(_shape_for(group_size), bits, group_size, quant_meta, dtype, offset=16)
            buffer = random_packed(layout, seed=bits + group_size)
            for mode in ("int16", "int8"):
                expected = INT16 if mode == "int16" or bits == 8 else INT8  # no VNNI in either build
                assert CPUKernels(int_activations=mode).multiplies_in(layout) == expected
                for tokens in (1, 2, 3, 5):
                    _check_int_path(layout, buffer, mode, dtype, tokens, seed=bits)
    for group_size in (16, 32):
        _check_rows_that_start_a_scale_range(group_size, "int16")
