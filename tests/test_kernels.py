"""Fused CPU kernels (the compiled C++ GEMV and dequantize) against the reference dequantize + F.linear, and the
engine with `kernels: fused` against `kernels: reference`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint
from kernel_cases import AWKWARD_SHAPES, FORMATS, assert_close_to_reference, layout_for, random_packed

import offload_engine
import offload_engine.kernels.cpu as cpu_kernels
from offload_engine.config import ConfigError
from offload_engine.kernels import REFERENCE, select_kernels
from offload_engine.kernels.cpu import GEMV_MAX_TOKENS, compiler_problem, shared_cpu_kernels
from offload_engine.kernels.packing import UnsupportedLayout
from offload_engine.quantize import QuantizationError

pytestmark = pytest.mark.skipif(compiler_problem() is not None, reason=f"no C++ compiler: {compiler_problem()}")
TOKENS = (1, 3, 6, GEMV_MAX_TOKENS + 3)  # GEMV token blocks (one, partial, two) and the dequantize + BLAS path


@pytest.mark.parametrize("bits,group_size,quant_meta", FORMATS)
def test_cpu_kernels_equal_reference_for_every_format(bits, group_size, quant_meta):
    # 104 rows: no block divides it; 3 groups per row; an offset like w3's inside an expert buffer
    layout = layout_for((104, 3 * group_size), bits, group_size, quant_meta, torch.float32, offset=48)
    buffer = random_packed(layout, seed=bits * 1000 + group_size)
    kernels = shared_cpu_kernels()
    for tokens in TOKENS:
        x = torch.randn(tokens, layout.shape[1], generator=torch.Generator().manual_seed(tokens))
        assert_close_to_reference(kernels.linear(x, layout, buffer), x, layout, buffer)


@pytest.mark.parametrize("shape", AWKWARD_SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cpu_kernels_on_awkward_shapes(shape, bits):
    try:
        layout = layout_for(shape, bits, 16, True, torch.float32)
    except QuantizationError:
        pytest.skip(f"{bits}-bit packing cannot hold {shape} in groups of 16")
    buffer = random_packed(layout, seed=shape[0] + bits)
    for tokens in (1, 5, GEMV_MAX_TOKENS + 1):
        x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens))
        assert_close_to_reference(shared_cpu_kernels().linear(x, layout, buffer), x, layout, buffer)


@pytest.mark.parametrize("fp32_only", [False, True], ids=["as-built", "fp32-path"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group_size,quant_meta", [(2, 16, True), (1, 32, True), (2, 64, False), (4, 64, False),
                                                        (3, 16, True)])
def test_cpu_kernels_in_half_precision_stay_within_the_references_rounding(dtype, bits, group_size, quant_meta,
                                                                            fp32_only):
    """bfloat16 with 1/2-bit codes runs on bfloat16 dot products where the CPU has them; fp32_only forces the
    fp32 path that every other case (and every CPU without AVX512-BF16) takes, so both are checked here."""
    layout = layout_for((96, 4 * group_size), bits, group_size, quant_meta, dtype)
    buffer = random_packed(layout, seed=7)
    kernels = cpu_kernels.CPUKernels(fp32_only=fp32_only)
    for tokens in (1, 5, GEMV_MAX_TOKENS, GEMV_MAX_TOKENS + 3):
        x = torch.randn(tokens, layout.shape[1], generator=torch.Generator().manual_seed(tokens)).to(dtype)
        assert_close_to_reference(kernels.linear(x, layout, buffer), x, layout, buffer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,quant_meta", [(2, True), (2, False), (1, True), (4, True), (8, False)])
def test_cpu_kernels_at_two_to_four_tokens_with_groups_of_16_in_every_dtype(bits, quant_meta, dtype):
    """Groups of 16 byte codes take the one-group-per-lane path on AVX-512 CPUs with VBMI (16 groups a block): 21
    groups per row (a full block and a partial one, which must not read past the row), 2-4 tokens (the decode
    sizes the hybrid engine runs on the CPU), every activation dtype, on each path (the default's int16 for
    float16 and bfloat16, bfloat16 dot products with int_activations="off", fp32)."""
    layout = layout_for((64, 21 * 16), bits, 16, quant_meta, dtype, offset=32)
    buffer = random_packed(layout, seed=bits + 10 * quant_meta)
    for kernels in (cpu_kernels.CPUKernels(), cpu_kernels.CPUKernels(int_activations="off"),
                    cpu_kernels.CPUKernels(fp32_only=True)):
        for tokens in (1, 2, 3, 4):
            x = torch.randn(tokens, layout.shape[1], generator=torch.Generator().manual_seed(tokens)).to(dtype)
            assert_close_to_reference(kernels.linear(x, layout, buffer), x, layout, buffer)


def test_bfloat16_multiplies_with_dot_products_where_the_cpu_has_them():
    """By default groups of 16 take int16 instead where it runs (tests/test_kernels_int.py), so `off` here."""
    kernels = cpu_kernels.CPUKernels(int_activations="off")
    groups_of_16 = layout_for((64, 256), 2, 16, True, torch.bfloat16)
    groups_of_32 = layout_for((64, 256), 2, 32, True, torch.bfloat16)
    if kernels.multiplies_in(groups_of_32) == "fp32":
        pytest.skip("this CPU has no AVX512-BF16: bfloat16 runs on the fp32 path")
    assert kernels.multiplies_in(groups_of_32) == "bfloat16 dot products on the reference's weights"
    assert shared_cpu_kernels().multiplies_in(groups_of_32) == "bfloat16 dot products on the reference's weights"
    assert kernels.multiplies_in(groups_of_16, tokens=GEMV_MAX_TOKENS) in (
        "bfloat16 dot products on the codes", "bfloat16 dot products on the reference's weights")  # VBMI or not
    assert kernels.multiplies_in(groups_of_16, tokens=GEMV_MAX_TOKENS + 1) == "fp32"  # dequantize + BLAS
    assert cpu_kernels.CPUKernels(fp32_only=True).multiplies_in(groups_of_16) == "fp32"


@pytest.mark.parametrize("bits,group_size,quant_meta,groups", [(2, 16, True, 8), (2, 16, True, 300), (2, 32, True, 300),
                                                               (1, 32, True, 8), (2, 64, False, 8)])
def test_bfloat16_dot_products_use_the_references_own_weights(bits, group_size, quant_meta, groups):
    """In bfloat16 the reference multiplies bfloat16 weights by bfloat16 x, summing in fp32; the dot-product path
    looks those very weights up in its tables, so its fp32 sums round to the exactly rounded product almost
    everywhere (a table entry off by one bfloat16 step would move whole rows)."""
    from offload_engine.quantize import dequantize

    # 300 groups per row: tabled 128 at a time (128, 128, 44), and several scale ranges per row
    layout = layout_for((256, groups * group_size), bits, group_size, quant_meta, torch.bfloat16)
    kernels = shared_cpu_kernels()
    if kernels.multiplies_in(layout) != "bfloat16 dot products on the reference's weights":
        pytest.skip(f"this CPU multiplies these groups in {kernels.multiplies_in(layout)} (tested above)")
    buffer = random_packed(layout, seed=bits)
    weight = dequantize(layout, layout.views(buffer))  # [N, K] bfloat16: the reference's weights
    for tokens in (1, 4, 7):
        x = torch.randn(tokens, layout.shape[1], generator=torch.Generator().manual_seed(tokens)).bfloat16()
        got = kernels.linear(x, layout, buffer)
        exact = (x.double() @ weight.double().T).bfloat16()  # the true sum of the same products, rounded once
        ulp = (exact.float().abs() * 2**-7).clamp_min(1e-30)
        assert ((got.float() - exact.float()).abs() <= ulp).all()  # within one bfloat16 step everywhere
        assert (got == exact).float().mean() > 0.98


@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336)])
def test_cpu_gemv_on_mixtral_expert_shapes(shape):
    layout = layout_for(shape, 2, 16, True, torch.float32)
    buffer = random_packed(layout, seed=shape[0])
    x = torch.randn(1, shape[1], generator=torch.Generator().manual_seed(0))
    assert_close_to_reference(shared_cpu_kernels().linear(x, layout, buffer), x, layout, buffer)


def test_cpu_kernels_on_a_matrix_quantized_by_hqq():
    from offload_engine.quantize import quantize_into

    layout = layout_for((64, 256), 2, 16, True, torch.float32)
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    quantize_into(torch.randn(64, 256) * 0.02, layout, buffer)
    x = torch.randn(2, 256)
    assert_close_to_reference(shared_cpu_kernels().linear(x, layout, buffer), x, layout, buffer)


def test_layouts_the_fused_kernels_cannot_read_are_named_at_load_time():
    odd = layout_for((32, 48), 2, 32, True, torch.float32)  # a group of 32 straddles rows of 48
    with pytest.raises(UnsupportedLayout, match="multiple of group_size"):
        shared_cpu_kernels().linear(torch.randn(1, 48), odd, random_packed(odd))
    with pytest.raises(ConfigError, match="group_size"):
        select_kernels("fused", torch.device("cpu"), [odd])
    with pytest.warns(RuntimeWarning, match="reference"):
        mixed = select_kernels("auto", torch.device("cpu"), [odd, layout_for((32, 64), 2, 16, True, torch.float32)])
    buffer = random_packed(odd)
    x = torch.randn(2, 48)
    assert torch.equal(mixed.linear(x, odd, buffer), REFERENCE.linear(x, odd, buffer))
    assert select_kernels("reference", torch.device("cpu"), [odd]) is REFERENCE


QUANTIZED = {"dtype": "float32", "quant": {"attention": {"bits": 4, "group_size": 32},
                                           "experts": {"bits": 2, "group_size": 16}}}


@pytest.fixture(scope="module")
def gentle_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("kernels"), std=0.04)


@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("prefetch", [0, 1])
def test_engine_with_fused_kernels_equals_reference_kernels(gentle_dir, k, prefetch):
    offload = {"experts_on_device": k, "prefetch": prefetch}
    fused = offload_engine.load(gentle_dir, config={**QUANTIZED, "kernels": "fused", "offload": offload},
                                progress=False)
    reference = offload_engine.load(gentle_dir, config={**QUANTIZED, "kernels": "reference", "offload": offload},
                                    progress=False)
    assert fused.stats()["kernels"] == "fused-cpu" and reference.stats()["kernels"] == "reference"
    # prefill: attention beyond GEMV_MAX_TOKENS (dequantize + BLAS), experts (a few tokens each) on the GEMV
    ids = torch.randint(0, 160, (1, GEMV_MAX_TOKENS + 6), generator=torch.Generator().manual_seed(k))
    assert (fused.logits(ids) - reference.logits(ids)).abs().max().item() < 1e-4
    prompt = ids[0, :5].tolist()  # decode: one token per expert, the GEMV path
    assert fused.generate_ids(prompt, max_new_tokens=12) == reference.generate_ids(prompt, max_new_tokens=12)


def test_auto_picks_the_fused_kernels_on_cpu_and_unquantized_models_need_none(gentle_dir):
    engine = offload_engine.load(gentle_dir, config=QUANTIZED, progress=False)
    assert engine.config.kernels == "auto" and engine.stats()["kernels"] == "fused-cpu"
    assert engine.stats()["kernel_warmup_s"] >= 0
    plain = offload_engine.load(gentle_dir, config={"dtype": "float32", "kernels": "fused", "quant": {
        "attention": {"bits": None}, "experts": {"bits": None}}}, progress=False)
    assert plain.stats()["kernels"] == "reference"  # nothing is quantized: plain F.linear
    with pytest.raises(ConfigError, match="kernels must be one of"):
        offload_engine.load(gentle_dir, config={**QUANTIZED, "kernels": "triton"}, progress=False)


def test_without_a_cpp_compiler_auto_warns_once_and_uses_the_reference(gentle_dir, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "compiler_problem", lambda: "no C++ compiler (g++) on the PATH")
    with pytest.warns(RuntimeWarning, match="no C.. compiler.*reference") as caught:
        engine = offload_engine.load(gentle_dir, config=QUANTIZED, progress=False)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert engine.stats()["kernels"] == "reference"
    with pytest.raises(ConfigError, match="kernels: fused is not available"):
        offload_engine.load(gentle_dir, config={**QUANTIZED, "kernels": "fused"}, progress=False)


def test_a_kernel_that_fails_to_compile_falls_back_under_auto(gentle_dir, monkeypatch):
    def broken(self, layout, device):
        raise RuntimeError("C++ compile error (injected)")

    monkeypatch.setattr(type(shared_cpu_kernels()), "warm_up", broken)
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        engine = offload_engine.load(gentle_dir, config=QUANTIZED, progress=False)
    assert engine.stats()["kernels"] == "reference"
    with pytest.raises(ConfigError, match="failed to compile"):
        offload_engine.load(gentle_dir, config={**QUANTIZED, "kernels": "fused"}, progress=False)


def test_the_cpu_kernel_library_is_built_once_per_format_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_ENGINE_CACHE", str(tmp_path))
    built = cpu_kernels._build(2, 16)
    assert built.parent == tmp_path / "cpu_kernels" and built.suffix == ".so"
    # no temporary file left behind; the size and checksum recorded beside the library
    assert sorted(p.name for p in built.parent.iterdir()) == [built.name, built.name + ".sha256"]
    mtime = built.stat().st_mtime_ns
    assert cpu_kernels._build(2, 16) == built and built.stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert cpu_kernels._build(4, 64) != built


def _damage_library(library, how: str) -> None:
    if how == "truncated":  # loading it would kill the process with SIGBUS
        with open(library, "r+b") as f:
            f.truncate(library.stat().st_size // 2)
    elif how == "garbage":
        library.write_bytes(bytes(range(256)) * (library.stat().st_size // 256))
    elif how == "record lost":
        (library.parent / (library.name + ".sha256")).unlink()


@pytest.mark.parametrize("how", ["truncated", "garbage", "record lost"])
def test_a_damaged_cached_library_is_rebuilt_with_a_warning_naming_it(how, tmp_path, monkeypatch, fresh_build):
    monkeypatch.setenv("OFFLOAD_ENGINE_CACHE", str(tmp_path))
    built = cpu_kernels._build(2, 16)
    intact = built.read_bytes()
    _damage_library(built, how)
    with pytest.warns(RuntimeWarning, match=f"{built}.*damaged.*rebuilding"):
        assert cpu_kernels._build(2, 16) == built
    assert built.read_bytes() == intact and cpu_kernels._damage(built) is None
    layout = layout_for((64, 256), 2, 16, True, torch.float32)
    buffer, x = random_packed(layout), torch.randn(2, 256)
    assert_close_to_reference(shared_cpu_kernels().linear(x, layout, buffer), x, layout, buffer)


def test_offload_chat_rebuilds_damaged_cached_libraries_instead_of_dying(tmp_path, monkeypatch):
    """Issue 19: a truncated cached library killed every later load with SIGBUS (exit 135, no message) and garbage
    bytes made every load fall back to the reference kernels. Both are damaged here, then the demo is run."""
    if not (Path(offload_engine.__file__).parent / "demo" / "model.safetensors").exists():
        pytest.skip("demo model not built")
    monkeypatch.setenv("OFFLOAD_ENGINE_CACHE", str(tmp_path))
    libraries = [cpu_kernels._build(bits, group) for bits, group in ((2, 16), (4, 64))]  # the demo's formats
    intact = [library.read_bytes() for library in libraries]
    for library, how in zip(libraries, ("truncated", "garbage")):
        _damage_library(library, how)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    offload_chat = [sys.executable, "-m", "offload_engine.cli"]  # the `offload-chat` entry point
    run = subprocess.run([*offload_chat, "--demo", "--prompt", "hi", "--max-new-tokens", "2"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "kernels fused-cpu" in run.stderr  # the fast kernels, not the reference fallback
    for library, before in zip(libraries, intact):
        assert str(library) in run.stderr and library.read_bytes() == before
    assert sorted(p.name for p in tmp_path.joinpath("cpu_kernels").iterdir()) == sorted(
        name for library in libraries for name in (library.name, library.name + ".sha256"))


def test_a_library_that_will_not_load_falls_back_with_a_warning_naming_it(gentle_dir, tmp_path, monkeypatch,
                                                                          fresh_build):
    """Issue 19 item 4: a cached library that passes its checks but that the loader refuses (here: the dynamic
    loader's error, injected) falls back under `auto` with a warning that names the file and the fix."""
    monkeypatch.setenv("OFFLOAD_ENGINE_CACHE", str(tmp_path))
    real_cdll = cpu_kernels.ctypes.CDLL

    def refusing_cdll(name, *args, **kwargs):
        if str(name).startswith(str(tmp_path)):
            raise OSError(f"{name}: invalid ELF header (injected)")
        return real_cdll(name, *args, **kwargs)

    monkeypatch.setattr(cpu_kernels.ctypes, "CDLL", refusing_cdll)
    with pytest.warns(RuntimeWarning, match="failed to compile") as caught:
        engine = offload_engine.load(gentle_dir, config=QUANTIZED, progress=False)
    assert engine.stats()["kernels"] == "reference"
    (message,) = [str(w.message) for w in caught if "failed to compile" in str(w.message)]
    library = next((tmp_path / "cpu_kernels").glob("*.so"))
    assert f"cannot load the CPU kernel library {library}" in message and "delete it to have it rebuilt" in message


def test_a_compiler_that_fails_leaves_nothing_behind_and_auto_falls_back(gentle_dir, tmp_path, monkeypatch,
                                                                          fresh_build):
    broken = tmp_path / "broken-g++"
    broken.write_text("#!/bin/sh\necho 'internal compiler error (injected)' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setenv("OFFLOAD_ENGINE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="failed to compile.*injected"):
        cpu_kernels._build(2, 16)
    assert list((tmp_path / "cache" / "cpu_kernels").iterdir()) == []
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        engine = offload_engine.load(gentle_dir, config=QUANTIZED, progress=False)
    assert engine.stats()["kernels"] == "reference"


def test_the_cpu_kernel_refuses_a_buffer_it_would_read_past():
    layout = layout_for((64, 256), 2, 16, True, torch.float32, offset=32)
    buffer = random_packed(layout)
    with pytest.raises(ValueError, match="too small"):
        shared_cpu_kernels().linear(torch.randn(1, 256), layout, buffer[:-1])
    with pytest.raises(ValueError, match="uint8"):
        shared_cpu_kernels().linear(torch.randn(1, 256), layout, buffer.float())
    with pytest.raises(ValueError, match=r"x must be \[tokens, 256\]"):
        shared_cpu_kernels().linear(torch.randn(1, 128), layout, buffer)


def _compilers() -> list[str]:
    import shutil

    return [c for c in ("g++", "g++-11", "clang++") if shutil.which(c)]


@pytest.mark.parametrize("compiler,extra_flags", [(c, f) for c in _compilers()
                                                  for f in ("", "-mno-f16c", "-mno-avx512vbmi", "-mno-avx512f")])
def test_the_cpu_kernel_builds_and_is_exact_with_each_compiler_here(compiler, extra_flags, tmp_path, monkeypatch,
                                                                    fresh_build):
    """g++ 11 (Colab's) has no _Float16; clang here has no libomp (the build then drops -fopenmp); -mno-f16c runs
    the portable float16 conversions instead of the F16C instructions; -mno-avx512vbmi the AVX-512 code of CPUs
    without VBMI (Skylake-X, Cascade Lake: no one-group-per-lane path); -mno-avx512f the AVX2 (8-lane) code."""
    import platform

    if extra_flags and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("F16C and AVX-512 are x86 extensions")
    monkeypatch.setenv("CXX", compiler)
    monkeypatch.setenv("OFFLOAD_ENGINE_CXXFLAGS", extra_flags)
    monkeypatch.setenv("OFFLOAD_ENGINE_CACHE", str(tmp_path))
    for bits, group_size, quant_meta in [(2, 16, True), (4, 64, False), (3, 16, True)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            layout = layout_for((40, 20 * group_size), bits, group_size, quant_meta, dtype)
            buffer = random_packed(layout, seed=bits)
            # bfloat16 also off int16 (the default's, for groups of 16): its own dot-product paths
            for kernels in [shared_cpu_kernels()] + [cpu_kernels.CPUKernels(int_activations="off")] * (
                    dtype == torch.bfloat16):
                for tokens in (1, 2, 5, GEMV_MAX_TOKENS + 1):
                    x = torch.randn(tokens, layout.shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
                    assert_close_to_reference(kernels.linear(x, layout, buffer), x, layout, buffer)
