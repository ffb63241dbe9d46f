"""Triton kernels against the reference path: on a CUDA GPU when there is one, otherwise on CPU under
TRITON_INTERPRET=1 (small shapes: the interpreter runs every program in numpy). Under the interpreter the bytes
every program loads and stores are recorded and compared with geometry.kernel_bytes (what `fused_traffic` counts),
and the launches of a call are counted."""

from __future__ import annotations

import contextlib
import os
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import REAL_CUDA, exact_config, make_checkpoint
from kernel_cases import FORMATS, assert_close_to_reference, layout_for, random_packed

pytest.importorskip("triton")
if not REAL_CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it before triton is first imported
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

import offload_engine  # noqa: E402
from offload_engine.kernels import fused_traffic  # noqa: E402
from offload_engine.kernels.geometry import (DOT_MAX_TOKENS, GEMV_MAX_TOKENS, kernel_bytes,  # noqa: E402
                                             plan_launch, shares_rows, warm_up_tokens)
from offload_engine.kernels.packing import PackedFormat  # noqa: E402
from offload_engine.kernels.triton_kernels import TritonKernels, _gemv, _qmm, _sum_splits  # noqa: E402
from offload_engine.quantize import QuantizationError  # noqa: E402

DEVICE = torch.device("cuda" if REAL_CUDA else "cpu")
# On a GPU these tests use it: mark them so (conftest pins the CPU for unmarked tests).
pytestmark = [pytest.mark.cuda] if REAL_CUDA else []
# one call per kernel variant: the GEMV at 1, 2, 3-4 and 5-8 tokens, tl.dot at each BLOCK_M, dequantize + matmul
TOKENS = (1, 2, 3, 7, GEMV_MAX_TOKENS + 5, 17, 40, DOT_MAX_TOKENS + 6)


def _run(layout, buffer, tokens: int, seed: int = 0):
    x = torch.randn(tokens, layout.shape[1], generator=torch.Generator().manual_seed(seed)).to(layout.dtype)
    got = TritonKernels(DEVICE).linear(x.to(DEVICE), layout, buffer.to(DEVICE)).cpu()
    return got, x


def _layouts(bits: int, group_size: int, quant_meta: bool, dtype=torch.float32, offset: int = 0):
    """Rows that share words (104) and, where the format allows, rows that do not (98, 100, 99)."""
    for shape in [(104, 3 * group_size), (98, 2 * group_size), (100, 2 * group_size), (99, 2 * group_size)]:
        try:
            yield layout_for(shape, bits, group_size, quant_meta, dtype, offset=offset)
        except QuantizationError:  # the packing needs a multiple of codes per word
            continue


@pytest.mark.parametrize("bits,group_size,quant_meta", FORMATS)
def test_triton_kernels_equal_reference_for_every_format(bits, group_size, quant_meta):
    # no block divides these row counts; 3 groups per row; an offset inside a larger buffer (like w3 in an expert)
    for layout in _layouts(bits, group_size, quant_meta, offset=32):
        buffer = random_packed(layout, seed=bits + group_size)
        for tokens in TOKENS:
            got, x = _run(layout, buffer, tokens, seed=tokens)
            assert_close_to_reference(got, x, layout, buffer)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size", [(2, 16), (4, 64), (3, 32)])
def test_triton_kernels_in_half_precision_stay_within_the_references_rounding(dtype, bits, group_size):
    if dtype == torch.bfloat16 and REAL_CUDA and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bfloat16 runs as float16 below compute capability 8.0")
    layout = layout_for((72, 4 * group_size), bits, group_size, True, dtype)
    buffer = random_packed(layout, seed=3)
    for tokens in TOKENS:
        got, x = _run(layout, buffer, tokens, seed=tokens)
        assert_close_to_reference(got, x, layout, buffer)


@pytest.mark.parametrize("bits,group_size", [(2, 16), (3, 64)])
def test_triton_gemv_split_along_k_sums_its_slices(bits, group_size):
    layout = layout_for((40, 40 * group_size), bits, group_size, True, torch.float32)
    assert plan_launch(PackedFormat.of(layout), 1, sms=4).splits > 1  # K is cut into slices, summed after
    buffer = random_packed(layout, seed=11)
    for tokens in (1, 2, 5):
        got, x = _run(layout, buffer, tokens, seed=tokens)
        assert_close_to_reference(got, x, layout, buffer)


# ---- what the kernels load, recorded under the interpreter ----
@contextlib.contextmanager
def recorded_accesses():
    """Every load and store of the Triton kernels launched inside, per (launch, program): byte addresses."""
    from triton.runtime import interpreter

    builder, executor = interpreter.interpreter_builder, interpreter.GridExecutor
    real_load, real_store, real_call = builder.create_masked_load, builder.create_masked_store, executor.__call__
    log = {"launches": 0, "load": {}, "store": {}, "launching": False}

    def record(kind, ptrs, mask):
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.int64)
        program = (log["launches"], builder.grid_idx)
        log[kind].setdefault(program, []).append((addresses[:, None] + np.arange(size)).ravel())

    def load(ptrs, mask, other, *args):
        record("load", ptrs, mask)
        return real_load(ptrs, mask, other, *args)

    def store(ptrs, value, mask, *args):
        record("store", ptrs, mask)
        return real_store(ptrs, value, mask, *args)

    def call(self, *args, **kwargs):
        log["launches"] += 1
        log["launching"] = True  # the interpreter's own torch calls (argument copies) are not the launcher's
        try:
            return real_call(self, *args, **kwargs)
        finally:
            log["launching"] = False

    builder.create_masked_load, builder.create_masked_store, executor.__call__ = load, store, call
    try:
        yield log
    finally:
        builder.create_masked_load, builder.create_masked_store, executor.__call__ = real_load, real_store, real_call


def bytes_by_buffer(per_program: dict, regions: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Distinct bytes per program, summed over programs, per named address range ("scratch": any other)."""
    totals = Counter()
    for chunks in per_program.values():
        addresses = np.unique(np.concatenate(chunks))
        inside = np.zeros(len(addresses), dtype=bool)
        for name, (start, end) in regions.items():
            hit = (addresses >= start) & (addresses < end)
            totals[name] += int(hit.sum())
            inside |= hit
        totals["scratch"] += int((~inside).sum())
    return {name: n for name, n in totals.items() if n}


ACCOUNTED = [(2, 16, True, (104, 48)), (2, 16, True, (98, 32)), (2, 64, True, (40, 2560)), (4, 64, False, (99, 128)),
             (3, 16, True, (104, 48)), (3, 64, True, (40, 2560)), (1, 32, True, (104, 96)), (8, 16, False, (100, 32))]


@pytest.mark.skipif(REAL_CUDA, reason="reads the Triton interpreter's loads (CPU only)")
@pytest.mark.parametrize("bits,group_size,quant_meta,shape", ACCOUNTED)
def test_kernel_bytes_are_what_the_kernels_load_and_store(bits, group_size, quant_meta, shape):
    """geometry.kernel_bytes, program by program, equals the loads and stores the interpreter executes: for rows
    that share words (each packed byte loaded once), rows that do not, split K, and every kernel."""
    layout = layout_for(shape, bits, group_size, quant_meta, torch.float32, offset=32)
    fmt = PackedFormat.of(layout)
    buffer = random_packed(layout, seed=5)
    kernels = TritonKernels("cpu")
    for tokens in (1, 3, 8, 12, 70):
        x = torch.randn(tokens, shape[1])
        with recorded_accesses() as log:
            out = kernels.linear(x, layout, buffer)
        regions = {s.name: (buffer.data_ptr() + s.offset, buffer.data_ptr() + s.offset + s.nbytes)
                   for s in layout.segments}
        regions |= {"x": (x.data_ptr(), x.data_ptr() + x.nbytes), "out": (out.data_ptr(), out.data_ptr() + out.nbytes)}
        expected = kernel_bytes(fmt, 4, tokens, 4)  # the interpreter's 4 "SMs"
        assert bytes_by_buffer(log["load"], regions) == expected.loads, (tokens, plan_launch(fmt, tokens, 4))
        assert bytes_by_buffer(log["store"], regions) == expected.stores, (tokens, plan_launch(fmt, tokens, 4))
        assert log["launches"] == expected.launches - (plan_launch(fmt, tokens, 4).kernel == "dequantize")
    if shares_rows(fmt) and fmt.pack > 1:  # every packed byte loaded exactly once, at any token count <= 64
        codes = next(s.nbytes for s in layout.segments if s.name == "codes")
        assert all(kernel_bytes(fmt, 4, t, 4).loads["codes"] == codes for t in range(1, DOT_MAX_TOKENS + 1))


def test_mixtral_gemv_reads_its_packed_bytes_once():
    """Issue 21: the 2-bit GEMV used to load each byte for 4 programs (one per row of its 4 codes)."""
    from offload_engine.config import QuantSpec
    from offload_engine.experts import ExpertLayout

    expert = ExpertLayout.build(4096, 14336, QuantSpec(2, 16), torch.float16)
    for name, layout in expert.matrices.items():
        fmt = PackedFormat.of(layout)
        for tokens in range(1, GEMV_MAX_TOKENS + 1):
            counted = kernel_bytes(fmt, 2, tokens, 40)  # a T4's 40 SMs
            assert counted.loads["codes"] == fmt.packed_rows * fmt.group_size, name  # one pass for all tokens
            assert counted.loads["scale_q"] == counted.loads["zero_q"] == fmt.n_groups
        assert layout.nbytes < fused_traffic(layout, 1) < 1.01 * layout.nbytes  # + x, y, partial sums


def test_a_quantized_matmul_is_one_launch_without_a_k_split_and_two_with():
    from torch.utils._python_dispatch import TorchDispatchMode

    class TorchOps(TorchDispatchMode):
        """The launcher's torch operators that would launch a kernel (views and allocations launch none)."""
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not (log["launching"] or func.is_view or func.__name__.startswith(("empty", "detach"))):
                self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    kernels = TritonKernels("cpu")
    for shape, splits in [((128, 64), False), ((40, 2560), True)]:
        layout = layout_for(shape, 2, 16, True, torch.float16)
        assert (plan_launch(PackedFormat.of(layout), 1, 4).splits > 1) == splits
        buffer = random_packed(layout)
        x = torch.randn(1, shape[1]).half()
        with recorded_accesses() as log, TorchOps() as torch_ops:  # noqa: F821 (log: bound by the with)
            kernels.linear(x, layout, buffer)
        assert log["launches"] == (2 if splits else 1) and torch_ops.ops == [], torch_ops.ops
        torch_ops.ops.clear()


def test_warm_up_covers_every_variant_a_call_can_launch():
    """Token counts are not specialised on (no compile for T = 1 or each multiple of 16), and the warm-up's token
    counts reach every (kernel, token block) a call of any length launches."""
    def unspecialised(fn) -> list[str]:  # a JITFunction, or the interpreter's wrapper of one
        if hasattr(fn, "params"):
            return [p.name for p in fn.params if p.do_not_specialize]
        return list(fn.kwargs["do_not_specialize"])

    assert unspecialised(_gemv) == unspecialised(_qmm) == ["T"] and unspecialised(_sum_splits) == ["count"]
    for bits, group_size, quant_meta in FORMATS:
        fmt = PackedFormat.of(layout_for((128, 4 * group_size), bits, group_size, quant_meta, torch.float16))
        for sms in (4, 40, 132):
            warmed = {(plan_launch(fmt, t, sms).kernel, plan_launch(fmt, t, sms).token_block)
                      for t in warm_up_tokens(fmt, sms)}
            assert all((plan_launch(fmt, t, sms).kernel, plan_launch(fmt, t, sms).token_block) in warmed
                       for t in range(1, 300))


def test_bfloat16_is_refused_below_compute_capability_8(monkeypatch):
    """A T4 (7.5) has no bfloat16 arithmetic: the fused kernels refuse it, and the engine runs float16 instead."""
    import warnings

    from offload_engine.config import ConfigError, load_config
    from offload_engine.loader import build_engine, resolve_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    t4 = TritonKernels(torch.device("cuda"))
    assert "compute capability 7.5" in t4.supports(layout_for((64, 64), 2, 16, True, torch.bfloat16))
    assert t4.supports(layout_for((64, 64), 2, 16, True, torch.float16)) is None
    bf16 = load_config("cpu")  # the demo's config: bfloat16
    with pytest.warns(RuntimeWarning, match="bfloat16 runs as float16 on cuda: Tesla T4 has compute capability 7.5"):
        assert resolve_dtype(bf16, torch.device("cuda")).dtype == "float16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference = offload_engine.load_config({**bf16.to_dict(), "kernels": "reference"})
        assert resolve_dtype(reference, torch.device("cuda")).dtype == "bfloat16"  # the slow path, asked for
        assert resolve_dtype(bf16, torch.device("cpu")).dtype == "bfloat16"
    # Weights stored in bfloat16 (a pre-quantized checkpoint) are not converted: one clear error, before allocating.
    with pytest.raises(ConfigError, match="stored in bfloat16 and Tesla T4.*dtype: float16.*kernels: reference"):
        build_engine(None, bf16, torch.device("cuda"), None, progress=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert TritonKernels(torch.device("cuda")).supports(layout_for((64, 64), 2, 16, True, torch.bfloat16)) is None


def test_triton_launches_on_the_tensors_device():
    from offload_engine.kernels.triton_kernels import _on_device

    context = _on_device(torch.device("cuda", 1))
    assert isinstance(context, torch.cuda.device) and context.idx == 1
    assert isinstance(_on_device(torch.device("cpu")), contextlib.nullcontext)


def test_triton_kernels_compile_for_t4_and_ampere_without_a_gpu():
    """Triton's compiler and its bundled ptxas build every kernel variant the engine launches on sm_75 and sm_80
    (nothing runs): the interpreter above checks the arithmetic, this checks that the GPU compiler accepts it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(root), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, str(root / "tests" / "triton_aot.py")], env=env, capture_output=True,
                            text=True, timeout=1200)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("this triton wheel ships no ptxas")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "kernel variants for sm_75" in result.stdout and "kernel variants for sm_80" in result.stdout


def test_triton_unsupported_group_size_is_named():
    layout = layout_for((32, 72), 2, 24, True, torch.float32)  # 24 divides 72 but is not a power of two
    assert "power of two" in TritonKernels(DEVICE).supports(layout)
    assert TritonKernels(DEVICE).supports(layout_for((32, 64), 2, 16, True, torch.float32)) is None


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_kernels_on_mixtral_expert_shapes(shape, dtype):
    layout = layout_for(shape, 2, 16, True, dtype)
    buffer = random_packed(layout, seed=1)
    for tokens in TOKENS:
        got, x = _run(layout, buffer, tokens)
        assert_close_to_reference(got, x, layout, buffer)


@pytest.mark.cuda
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("prefetch", [0, 1])
def test_cuda_engine_with_triton_kernels_equals_reference_kernels(tmp_path_factory, k, prefetch):
    path = make_checkpoint(tmp_path_factory.mktemp("triton"), std=0.04)
    quant = {"attention": {"bits": 4, "group_size": 32}, "experts": {"bits": 2, "group_size": 16}}
    engines = {}
    for choice in ("fused", "reference"):
        config = {**exact_config(experts_on_device=k, prefetch=prefetch), "quant": quant, "kernels": choice}
        engines[choice] = offload_engine.load(path, config=config, device="cuda", progress=False)
    assert engines["fused"].stats()["kernels"] == "fused-triton"
    ids = torch.randint(0, 160, (1, 12), generator=torch.Generator().manual_seed(k))
    assert (engines["fused"].logits(ids) - engines["reference"].logits(ids)).abs().max().item() < 1e-4
    prompt = ids[0, :5].tolist()
    assert (engines["fused"].generate_ids(prompt, max_new_tokens=12)
            == engines["reference"].generate_ids(prompt, max_new_tokens=12))
