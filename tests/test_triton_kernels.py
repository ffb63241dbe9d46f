"""Triton kernels against the reference path: on a CUDA GPU when there is one, otherwise on CPU under
TRITON_INTERPRET=1 (small shapes: the interpreter runs every program in numpy)."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it before triton is first imported
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from conftest import exact_config, make_checkpoint  # noqa: E402
from kernel_cases import FORMATS, assert_close_to_reference, layout_for, random_packed  # noqa: E402

import offload_engine  # noqa: E402
from offload_engine.kernels.triton_kernels import DOT_MAX_TOKENS, GEMV_MAX_TOKENS, TritonKernels  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
# one call per kernel: split-K GEMV (1 and a few tokens), tiled tl.dot, dequantize + matmul
TOKENS = (1, 3, GEMV_MAX_TOKENS + 5, DOT_MAX_TOKENS + 6)


def _run(layout, buffer, tokens: int, seed: int = 0):
    x = torch.randn(tokens, layout.shape[1], generator=torch.Generator().manual_seed(seed)).to(layout.dtype)
    got = TritonKernels().linear(x.to(DEVICE), layout, buffer.to(DEVICE)).cpu()
    return got, x


@pytest.mark.parametrize("bits,group_size,quant_meta", FORMATS)
def test_triton_kernels_equal_reference_for_every_format(bits, group_size, quant_meta):
    # 104 rows (no block divides it), 3 groups per row, an offset inside a larger buffer (like w3 in an expert)
    layout = layout_for((104, 3 * group_size), bits, group_size, quant_meta, torch.float32, offset=32)
    buffer = random_packed(layout, seed=bits + group_size)
    for tokens in TOKENS:
        got, x = _run(layout, buffer, tokens, seed=tokens)
        assert_close_to_reference(got, x, layout, buffer)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size", [(2, 16), (4, 64), (3, 32)])
def test_triton_kernels_in_half_precision_stay_within_the_references_rounding(dtype, bits, group_size):
    layout = layout_for((72, 4 * group_size), bits, group_size, True, dtype)
    buffer = random_packed(layout, seed=3)
    for tokens in TOKENS:
        got, x = _run(layout, buffer, tokens, seed=tokens)
        assert_close_to_reference(got, x, layout, buffer)


@pytest.mark.parametrize("bits,group_size", [(2, 16), (3, 64)])
def test_triton_gemv_split_along_k_sums_its_slices(bits, group_size):
    from offload_engine.kernels import gemv_k_splits

    layout = layout_for((40, 40 * group_size), bits, group_size, True, torch.float32)
    assert gemv_k_splits(*layout.shape, group_size, sms=4) > 1  # K is cut into slices, summed after
    buffer = random_packed(layout, seed=11)
    for tokens in (1, 2):
        got, x = _run(layout, buffer, tokens, seed=tokens)
        assert_close_to_reference(got, x, layout, buffer)


def test_triton_kernels_compile_for_t4_and_ampere_without_a_gpu():
    """Triton's compiler and its bundled ptxas build every kernel variant for sm_75 and sm_80 (nothing runs): the
    interpreter above checks the arithmetic, this checks that the GPU compiler accepts the code."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(root), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, str(root / "tests" / "triton_aot.py")], env=env, capture_output=True,
                            text=True, timeout=900)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("this triton wheel ships no ptxas")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "compiled" in result.stdout


def test_triton_unsupported_group_size_is_named():
    layout = layout_for((32, 72), 2, 24, True, torch.float32)  # 24 divides 72 but is not a power of two
    assert "power of two" in TritonKernels().supports(layout)
    assert TritonKernels().supports(layout_for((32, 64), 2, 16, True, torch.float32)) is None


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (Mixtral-sized matrices are too slow in the interpreter)")
@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_kernels_on_mixtral_expert_shapes(shape, dtype):
    layout = layout_for(shape, 2, 16, True, dtype)
    buffer = random_packed(layout, seed=1)
    for tokens in TOKENS:
        got, x = _run(layout, buffer, tokens)
        assert_close_to_reference(got, x, layout, buffer)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
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
