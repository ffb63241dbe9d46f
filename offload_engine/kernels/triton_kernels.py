"""CUDA kernels in Triton: quantized matmuls that read hqq's packed codes and 8/16-bit scale/zero codes directly.

Three kernels, picked by how many tokens the matrix sees in one call (an expert sees 1 token per decode step):
  * `_gemv`: 1 .. GEMV_MAX_TOKENS tokens. Split-K GEMV: each program owns BLOCK_N rows and a slice of the groups,
    loads [BLOCK_N, BLOCK_G, g] codes (coalesced along K), and applies the group-sum identity in fp32
    (y_n += s_ng * (sum_k q_nk x_k - z_ng * sum_k x_k)). Partial sums of the K slices are added by one torch sum.
  * `_qmm`: up to DOT_MAX_TOKENS tokens. Tiled `tl.dot`: each [BLOCK_N, BLOCK_K] weight tile is dequantized in
    registers and multiplied with a [BLOCK_M, BLOCK_K] tile of x, fp32 accumulation.
  * `_dequantize`: beyond that (long prefills). One pass writes the full matrix into a reused scratch buffer and
    cuBLAS does the matmul: at that size the matmul is compute-bound and cuBLAS is hard to beat.
Scales and zeros are rounded through the compute dtype exactly as the reference path rounds them.

Under TRITON_INTERPRET=1 (CI on CPU) the same kernels run in numpy; its bfloat16 arithmetic is wrong, so loads are
cast to fp32 and `tl.dot` runs in fp32 there (`DOT_DTYPE`).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..quantize import MatrixLayout
from .packing import PackedFormat
from .split_k import GEMV_BLOCK_K as BLOCK_K
from .split_k import GEMV_BLOCK_N, gemv_k_splits

GEMV_MAX_TOKENS = 8
DOT_MAX_TOKENS = 64
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _dequant_tile(codes_ptr, s_ptr, srange_ptr, z_ptr, zrange_ptr, rows, gr, N, K, S, R,
                  BITS: tl.constexpr, PACK: tl.constexpr, GS: tl.constexpr, QUANT_META: tl.constexpr,
                  SCALE_GROUP: tl.constexpr, ALIGNED: tl.constexpr, ROUND: tl.constexpr):
    """Codes [BN, BG, GS] (float32) and per-group scale, zero [BN, BG] of rows x groups `gr` (masked)."""
    G = K // GS
    j = tl.arange(0, GS)
    ok = (rows[:, None] < N) & (gr[None, :] < G)  # [BN, BG]
    i = rows[:, None] * G + gr[None, :]  # group index, [BN, BG]
    if ALIGNED:  # S is a multiple of G: a row's groups share one word row and one shift (Mixtral's shapes)
        slot = rows // R  # [BN]
        word_idx = (rows % R)[:, None, None] * K + gr[None, :, None] * GS + j[None, None, :]
        shift = (BITS * (PACK - 1 - slot))[:, None, None]
    else:
        slot = i // S
        word_idx = (i % S)[:, :, None] * GS + j[None, None, :]
        shift = (BITS * (PACK - 1 - slot))[:, :, None]
    words = tl.load(codes_ptr + word_idx, mask=ok[:, :, None], other=0)
    q = ((words.to(tl.int32) >> shift) & ((1 << BITS) - 1)).to(tl.float32)  # [BN, BG, GS]: zero-extend, shift
    if QUANT_META:
        sg = i // SCALE_GROUP
        scale = (tl.load(s_ptr + i, mask=ok, other=0).to(tl.float32)
                 * tl.load(srange_ptr + 2 * sg + 1, mask=ok, other=0).to(tl.float32)
                 + tl.load(srange_ptr + 2 * sg, mask=ok, other=0).to(tl.float32))
        zero = (tl.load(z_ptr + i, mask=ok, other=0).to(tl.float32) * tl.load(zrange_ptr + 1)
                + tl.load(zrange_ptr))
    else:
        scale = tl.load(s_ptr + i, mask=ok, other=0).to(tl.float32)
        zero = tl.load(z_ptr + i, mask=ok, other=0).to(tl.float32)
    scale = scale.to(ROUND).to(tl.float32)
    zero = zero.to(ROUND).to(tl.float32)
    return q, scale, zero


@triton.jit
def _gemv(x_ptr, out_ptr, codes_ptr, s_ptr, srange_ptr, z_ptr, zrange_ptr, T, N, K, S, R, groups_per_split,
          BITS: tl.constexpr, PACK: tl.constexpr, GS: tl.constexpr, QUANT_META: tl.constexpr,
          SCALE_GROUP: tl.constexpr, ALIGNED: tl.constexpr, ROUND: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """out[split, t, rows] = partial y for token t over this program's slice of groups."""
    pid_n, split, t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G = K // GS
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, GS)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    g_lo = split * groups_per_split
    g_hi = tl.minimum(g_lo + groups_per_split, G)
    for g0 in range(g_lo, g_hi, BLOCK_G):
        gr = g0 + tl.arange(0, BLOCK_G)
        gr = tl.where(gr < g_hi, gr, G)  # groups past this slice are masked like groups past the row
        q, scale, zero = _dequant_tile(codes_ptr, s_ptr, srange_ptr, z_ptr, zrange_ptr, rows, gr, N, K, S, R,
                                       BITS, PACK, GS, QUANT_META, SCALE_GROUP, ALIGNED, ROUND)
        xv = tl.load(x_ptr + t * K + gr[:, None] * GS + j[None, :], mask=(gr < G)[:, None], other=0)
        xv = xv.to(tl.float32)  # [BG, GS]
        dot = tl.sum(q * xv[None, :, :], axis=2)  # [BN, BG]
        acc += tl.sum(scale * (dot - zero * tl.sum(xv, axis=1)[None, :]), axis=1)
    tl.store(out_ptr + (split * T + t) * N + rows, acc, mask=rows < N)


@triton.jit
def _qmm(x_ptr, out_ptr, codes_ptr, s_ptr, srange_ptr, z_ptr, zrange_ptr, T, N, K, S, R,
         BITS: tl.constexpr, PACK: tl.constexpr, GS: tl.constexpr, QUANT_META: tl.constexpr,
         SCALE_GROUP: tl.constexpr, ALIGNED: tl.constexpr, ROUND: tl.constexpr, DOT_DTYPE: tl.constexpr,
         DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """out[T, N] = x[T, K] @ W.T, one [BLOCK_M, BLOCK_N] tile per program."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    G = K // GS
    tokens = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_G * GS)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gr = g0 + tl.arange(0, BLOCK_G)
        q, scale, zero = _dequant_tile(codes_ptr, s_ptr, srange_ptr, z_ptr, zrange_ptr, rows, gr, N, K, S, R,
                                       BITS, PACK, GS, QUANT_META, SCALE_GROUP, ALIGNED, ROUND)
        w = tl.reshape((q - zero[:, :, None]) * scale[:, :, None], (BLOCK_N, BLOCK_G * GS))  # [BN, BK]
        k = g0 * GS + cols
        xv = tl.load(x_ptr + tokens[:, None] * K + k[None, :], mask=(tokens[:, None] < T) & (k[None, :] < K),
                     other=0)  # [BM, BK]
        acc += tl.dot(xv.to(tl.float32).to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    mask = (tokens[:, None] < T) & (rows[None, :] < N)
    tl.store(out_ptr + tokens[:, None] * N + rows[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize(out_ptr, codes_ptr, s_ptr, srange_ptr, z_ptr, zrange_ptr, N, K, S, R,
                BITS: tl.constexpr, PACK: tl.constexpr, GS: tl.constexpr, QUANT_META: tl.constexpr,
                SCALE_GROUP: tl.constexpr, ALIGNED: tl.constexpr, ROUND: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """out[N, K] = the dequantized matrix, one [BLOCK_N, BLOCK_G * GS] tile per program."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    gr = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    q, scale, zero = _dequant_tile(codes_ptr, s_ptr, srange_ptr, z_ptr, zrange_ptr, rows, gr, N, K, S, R,
                                   BITS, PACK, GS, QUANT_META, SCALE_GROUP, ALIGNED, ROUND)
    w = (q - zero[:, :, None]) * scale[:, :, None]  # [BN, BG, GS]
    col = gr[None, :, None] * GS + tl.arange(0, GS)[None, None, :]
    mask = (rows[:, None, None] < N) & (gr[None, :, None] < K // GS)
    tl.store(out_ptr + rows[:, None, None] * K + col, w.to(out_ptr.dtype.element_ty), mask=mask)


class TritonKernels:
    """Quantized matmuls for CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)."""

    name = "fused-triton"

    def __init__(self) -> None:
        self._scratch: dict[torch.device, torch.Tensor] = {}  # reused by `_dequantize` (long prefills)

    def supports(self, layout: MatrixLayout) -> str | None:
        if layout.spec.bits is None:
            return "not quantized"
        try:
            fmt = PackedFormat.of(layout)
        except ValueError as e:
            return str(e)
        if fmt.group_size & (fmt.group_size - 1):
            return f"group_size {fmt.group_size} is not a power of two (Triton tiles need one)"
        return None

    @staticmethod
    @functools.cache  # called for every matmul: the launch constants depend on the layout alone
    def _constants(layout: MatrixLayout) -> tuple[PackedFormat, tuple[int, int, int, int], dict]:
        fmt = PackedFormat.of(layout)
        aligned = fmt.packed_rows % fmt.groups_per_row == 0
        rows_per_slot = fmt.packed_rows // fmt.groups_per_row if aligned else 1
        # The interpreter's bfloat16 arithmetic is wrong (numpy has none): keep scales in fp32 there.
        round_dtype = tl.float32 if INTERPRET and layout.dtype == torch.bfloat16 else _TL_DTYPES[layout.dtype]
        meta = dict(BITS=fmt.bits, PACK=fmt.pack, GS=fmt.group_size, QUANT_META=fmt.quant_meta,
                    SCALE_GROUP=fmt.scale_group, ALIGNED=aligned, ROUND=round_dtype)
        return fmt, (fmt.out_features, fmt.in_features, fmt.packed_rows, rows_per_slot), meta

    @staticmethod
    def _pointers(layout: MatrixLayout, buffer: torch.Tensor) -> tuple[torch.Tensor, ...]:
        views = layout.views(buffer)
        if layout.spec.quant_meta:
            return views["codes"], views["scale_q"], views["scale_range"], views["zero_q"], views["zero_range"]
        return views["codes"], views["scale"], views["scale"], views["zero"], views["zero"]  # no ranges: unread

    def linear(self, x: torch.Tensor, layout: MatrixLayout, buffer: torch.Tensor) -> torch.Tensor:
        """y = x @ W.T for W in `layout` within `buffer`.  x: [T, K] -> [T, N] in the layout's dtype."""
        if layout.spec.bits is None:
            return torch.nn.functional.linear(x, layout.views(buffer)["weight"])
        fmt, dims, meta = self._constants(layout)
        ptrs = self._pointers(layout, buffer)
        N, K = dims[0], dims[1]
        x = x.contiguous()
        T = x.shape[0]
        block_g = max(1, BLOCK_K // fmt.group_size)
        if T <= GEMV_MAX_TOKENS:
            split = gemv_k_splits(N, K, fmt.group_size, self._sms(x.device))
            per_split = triton.cdiv(triton.cdiv(fmt.groups_per_row, split), block_g) * block_g
            split = triton.cdiv(fmt.groups_per_row, per_split)
            partial = torch.empty(split, T, N, dtype=torch.float32, device=x.device)
            _gemv[(triton.cdiv(N, GEMV_BLOCK_N), split, T)](x, partial, *ptrs, T, *dims, per_split, **meta,
                                                            BLOCK_N=GEMV_BLOCK_N, BLOCK_G=block_g, num_warps=4)
            return partial.sum(0).to(layout.dtype)
        if T <= DOT_MAX_TOKENS and self._dot_ok(x):
            out = torch.empty(T, N, dtype=layout.dtype, device=x.device)
            dot_dtype = tl.float32 if INTERPRET or layout.dtype == torch.float32 else _TL_DTYPES[layout.dtype]
            block_m = 16 if T <= 16 else (32 if T <= 32 else 64)
            grid = (triton.cdiv(T, block_m), triton.cdiv(N, 64))
            precision = "ieee" if dot_dtype == tl.float32 else "tf32"  # fp32: exact products, not TF32's
            _qmm[grid](x, out, *ptrs, T, *dims, **meta, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
                       BLOCK_M=block_m, BLOCK_N=64, BLOCK_G=block_g, num_warps=4)
            return out
        weight = self._scratch_for(x.device, N * K, layout.dtype).view(N, K)
        grid = (triton.cdiv(N, 32), triton.cdiv(fmt.groups_per_row, block_g))
        _dequantize[grid](weight, *ptrs, *dims, **meta, BLOCK_N=32, BLOCK_G=block_g, num_warps=4)
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def _dot_ok(x: torch.Tensor) -> bool:
        """tl.dot on bf16 needs tensor cores with bf16 (sm_80+); a T4 (sm_75) takes the dequantize path instead."""
        if INTERPRET or x.dtype != torch.bfloat16 or x.device.type != "cuda":
            return True
        return torch.cuda.get_device_capability(x.device)[0] >= 8

    @staticmethod
    def _sms(device: torch.device) -> int:
        """Streaming multiprocessors (the interpreter on CPU pretends to have 4, so that K gets split in tests)."""
        return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4

    def _scratch_for(self, device: torch.device, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat scratch buffer of at least `numel` elements, kept for the next long prefill."""
        nbytes = numel * dtype.itemsize
        scratch = self._scratch.get(device)
        if scratch is None or scratch.numel() < nbytes:
            scratch = self._scratch[device] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return scratch[:nbytes].view(dtype)

    def warm_up(self, layout: MatrixLayout, device: torch.device) -> None:
        """Compile the kernels `layout` uses (Triton compiles per constexpr specialisation on first launch)."""
        buffer = torch.zeros(layout.start + layout.nbytes, dtype=torch.uint8, device=device)
        for tokens in (1, GEMV_MAX_TOKENS + 1, DOT_MAX_TOKENS + 1):
            self.linear(torch.zeros(tokens, layout.shape[1], dtype=layout.dtype, device=device), layout, buffer)
