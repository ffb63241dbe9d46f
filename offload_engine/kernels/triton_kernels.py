"""CUDA kernels in Triton: quantized matmuls that read hqq's packed codes and 8/16-bit scale/zero codes directly.

Which kernel a call runs, its grid and blocks come from geometry.plan_launch, which also counts what the kernels
load. Where PACK output rows share each word (geometry.py: Mixtral's 2- and 4-bit matrices), a program owns a
block of base rows and all PACK rows stored in their words, so each packed byte is loaded once:
  * `_gemv`: 1 .. GEMV_MAX_TOKENS tokens, all in one pass: each [rows, groups, g] tile of codes is loaded once
    and applied to every token (group-sum identity in fp32: y_n += s_ng * (sum_k q_nk x_k - z_ng * sum_k x_k)).
    Split-K when the rows alone give too few programs; `_sum_splits` then adds the K slices into y. One launch
    without a split, two with.
  * `_qmm`: up to DOT_MAX_TOKENS tokens. Tiled `tl.dot`: each [rows, BLOCK_K] weight tile is dequantized in
    registers and multiplied with a [BLOCK_M, BLOCK_K] tile of x, fp32 accumulation.
  * `_dequantize`: beyond that (long prefills). One pass writes the full matrix into a reused scratch buffer and
    cuBLAS does the matmul: at that size the matmul is compute-bound and cuBLAS is hard to beat.
Scales and zeros are rounded through the compute dtype exactly as the reference path rounds them. Token counts
are not specialised on (`do_not_specialize`: Triton would compile again for T = 1 and each multiple of 16), and
`warm_up` compiles every variant a layout can launch (geometry.warm_up_tokens), so no reply waits for a compile.
bfloat16 needs compute capability 8.0 (`supports` refuses it below: see kernels/capability.py).

Under TRITON_INTERPRET=1 (CI on CPU) the same kernels run in numpy; its bfloat16 arithmetic is wrong, so loads are
cast to fp32 and `tl.dot` runs in fp32 there (`DOT_DTYPE`).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ..quantize import MatrixLayout
from .capability import bfloat16_problem
from .geometry import DOT_MAX_TOKENS, GEMV_MAX_TOKENS, REDUCE_BLOCK, plan_launch, shares_rows, warm_up_tokens
from .packing import PackedFormat

__all__ = ["TritonKernels", "GEMV_MAX_TOKENS", "DOT_MAX_TOKENS"]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NUM_WARPS = 4

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _rows(base, N, R, SLOTS: tl.constexpr):
    """Output rows [SLOTS, BR] of base rows `base` [BR] (slot q holds rows q * R + base) and which are live."""
    rows = tl.arange(0, SLOTS)[:, None] * R + base[None, :]
    return rows, (base[None, :] < R) & (rows < N)


@triton.jit
def _dequant_tile(codes_ptr, s_ptr, srange_ptr, z_ptr, zrange_ptr, base, rows, live, gr, N, K, S, R,
                  BITS: tl.constexpr, PACK: tl.constexpr, GS: tl.constexpr, QUANT_META: tl.constexpr,
                  SCALE_GROUP: tl.constexpr, SHARED: tl.constexpr, ROUND: tl.constexpr):
    """Codes [SLOTS, BR, BG, GS] (fp32) and per-group scale, zero [SLOTS, BR, BG] of `rows` x groups `gr`."""
    G = K // GS
    j = tl.arange(0, GS)
    i = rows[:, :, None] * G + gr[None, None, :]  # group index, [SLOTS, BR, BG]
    ok = live[:, :, None] & (gr[None, None, :] < G)
    mask = (1 << BITS) - 1
    if SHARED:  # word row base * G + group holds slot q's code at bits BITS * (PACK - 1 - q): loaded once
        word_idx = base[:, None, None] * K + gr[None, :, None] * GS + j[None, None, :]  # [BR, BG, GS]
        word_ok = (base < R)[:, None, None] & (gr < G)[None, :, None]
        words = tl.load(codes_ptr + word_idx, mask=word_ok, other=0).to(tl.int32)  # uint8: zero-extended
        shift = BITS * (PACK - 1 - tl.arange(0, PACK))
        q = (words[None, :, :, :] >> shift[:, None, None, None]) & mask
    else:  # every row reads its own words: group i in word row i % S, slot i // S
        words = tl.load(codes_ptr + (i % S)[:, :, :, None] * GS + j[None, None, None, :], mask=ok[:, :, :, None],
                        other=0).to(tl.int32)
        q = (words >> (BITS * (PACK - 1 - i // S))[:, :, :, None]) & mask
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
    return q.to(tl.float32), scale.to(ROUND).to(tl.float32), zero.to(ROUND).to(tl.float32)


@triton.jit(do_not_specialize=["T"])
def _gemv(x_ptr, out_ptr, codes_ptr, s_ptr, srange_ptr, z_ptr, zrange_ptr, T, N, K, S, R, groups_per_split,
          BITS: tl.constexpr, PACK: tl.constexpr, GS: tl.constexpr, QUANT_META: tl.constexpr,
          SCALE_GROUP: tl.constexpr, SHARED: tl.constexpr, SLOTS: tl.constexpr, ROUND: tl.constexpr,
          BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, TOKENS: tl.constexpr):
    """out[split, t, row] for every token t < T (TOKENS >= T): this program's rows over its slice of the groups."""
    pid, split = tl.program_id(0), tl.program_id(1)
    G = K // GS
    base = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rows, live = _rows(base, N, R, SLOTS)
    j = tl.arange(0, GS)
    tok = tl.arange(0, TOKENS)
    acc = tl.zeros([SLOTS, BLOCK_R, TOKENS], dtype=tl.float32)
    g_lo = split * groups_per_split
    g_hi = tl.minimum(g_lo + groups_per_split, G)
    for g0 in range(g_lo, g_hi, BLOCK_G):
        gr = g0 + tl.arange(0, BLOCK_G)
        gr = tl.where(gr < g_hi, gr, G)  # groups past this slice are masked like groups past the row
        q, scale, zero = _dequant_tile(codes_ptr, s_ptr, srange_ptr, z_ptr, zrange_ptr, base, rows, live, gr, N, K,
                                       S, R, BITS, PACK, GS, QUANT_META, SCALE_GROUP, SHARED, ROUND)
        for t in tl.static_range(TOKENS):  # the codes stay in registers for every token
            live_groups = tl.where(T > t, G, 0)  # no groups of tokens past T
            xv = tl.load(x_ptr + t * K + gr[:, None] * GS + j[None, :], mask=(gr < live_groups)[:, None],
                         other=0).to(tl.float32)  # [BG, GS]
            dot = tl.sum(q * xv[None, None, :, :], axis=3)  # [SLOTS, BR, BG]
            part = tl.sum(scale * (dot - zero * tl.sum(xv, axis=1)[None, None, :]), axis=2)  # [SLOTS, BR]
            acc = tl.where(tok[None, None, :] == t, acc + part[:, :, None], acc)
    offsets = (split * T + tok[None, None, :]) * N + rows[:, :, None]
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=live[:, :, None] & (tok < T)[None, None, :])


@triton.jit(do_not_specialize=["count"])
def _sum_splits(partial_ptr, out_ptr, count, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """out[e] = sum over the K slices of partial[slice, e] (fp32), in out's dtype."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(partial_ptr + s * count + e, mask=e < count, other=0)
    tl.store(out_ptr + e, acc.to(out_ptr.dtype.element_ty), mask=e < count)


@triton.jit(do_not_specialize=["T"])
def _qmm(x_ptr, out_ptr, codes_ptr, s_ptr, srange_ptr, z_ptr, zrange_ptr, T, N, K, S, R,
         BITS: tl.constexpr, PACK: tl.constexpr, GS: tl.constexpr, QUANT_META: tl.constexpr,
         SCALE_GROUP: tl.constexpr, SHARED: tl.constexpr, SLOTS: tl.constexpr, ROUND: tl.constexpr,
         DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
         BLOCK_G: tl.constexpr):
    """out[T, N] = x[T, K] @ W.T, one [BLOCK_M, SLOTS * BLOCK_R] tile per program."""
    pid_m, pid_r = tl.program_id(0), tl.program_id(1)
    G = K // GS
    tokens = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rows, live = _rows(base, N, R, SLOTS)
    flat = tl.arange(0, SLOTS * BLOCK_R)  # the tile's rows flattened slot-major, as tl.reshape orders them
    flat_base = pid_r * BLOCK_R + flat % BLOCK_R
    flat_rows = (flat // BLOCK_R) * R + flat_base
    cols = tl.arange(0, BLOCK_G * GS)
    acc = tl.zeros([BLOCK_M, SLOTS * BLOCK_R], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gr = g0 + tl.arange(0, BLOCK_G)
        q, scale, zero = _dequant_tile(codes_ptr, s_ptr, srange_ptr, z_ptr, zrange_ptr, base, rows, live, gr, N, K,
                                       S, R, BITS, PACK, GS, QUANT_META, SCALE_GROUP, SHARED, ROUND)
        w = tl.reshape((q - zero[:, :, :, None]) * scale[:, :, :, None], (SLOTS * BLOCK_R, BLOCK_G * GS))
        k = g0 * GS + cols
        xv = tl.load(x_ptr + tokens[:, None] * K + k[None, :], mask=(tokens[:, None] < T) & (k[None, :] < K),
                     other=0)  # [BM, BK]
        acc += tl.dot(xv.to(tl.float32).to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    mask = (tokens[:, None] < T) & ((flat_base < R) & (flat_rows < N))[None, :]
    tl.store(out_ptr + tokens[:, None] * N + flat_rows[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize(out_ptr, codes_ptr, s_ptr, srange_ptr, z_ptr, zrange_ptr, N, K, S, R,
                BITS: tl.constexpr, PACK: tl.constexpr, GS: tl.constexpr, QUANT_META: tl.constexpr,
                SCALE_GROUP: tl.constexpr, SHARED: tl.constexpr, SLOTS: tl.constexpr, ROUND: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """out[N, K] = the dequantized matrix, one [SLOTS * BLOCK_R, BLOCK_G * GS] tile per program."""
    base = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows, live = _rows(base, N, R, SLOTS)
    gr = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    q, scale, zero = _dequant_tile(codes_ptr, s_ptr, srange_ptr, z_ptr, zrange_ptr, base, rows, live, gr, N, K, S, R,
                                   BITS, PACK, GS, QUANT_META, SCALE_GROUP, SHARED, ROUND)
    w = (q - zero[:, :, :, None]) * scale[:, :, :, None]  # [SLOTS, BR, BG, GS]
    col = gr[:, None] * GS + tl.arange(0, GS)[None, :]  # [BG, GS]
    mask = live[:, :, None, None] & (gr < K // GS)[None, None, :, None]
    tl.store(out_ptr + rows[:, :, None, None] * K + col[None, None, :, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (device='cuda:1' on a multi-GPU machine)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class TritonKernels:
    """Quantized matmuls for CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)."""

    name = "fused-triton"

    def __init__(self, device: torch.device | str = "cuda") -> None:
        device = torch.device(device)
        self._bfloat16_problem = bfloat16_problem(device) if device.type == "cuda" else None
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
        if layout.dtype == torch.bfloat16 and self._bfloat16_problem:
            return f"{self._bfloat16_problem}: use dtype: float16"
        return None

    @staticmethod
    @functools.cache  # called for every matmul: the launch constants depend on the layout alone
    def constants(layout: MatrixLayout) -> tuple[PackedFormat, tuple[int, int, int, int], dict]:
        """The packed format, (N, K, S, R) and the constexprs every kernel of `layout` is specialised on."""
        fmt = PackedFormat.of(layout)
        shared = shares_rows(fmt)
        rows_per_slot = fmt.packed_rows // fmt.groups_per_row if shared else fmt.out_features
        # The interpreter's bfloat16 arithmetic is wrong (numpy has none): keep scales in fp32 there.
        round_dtype = tl.float32 if INTERPRET and layout.dtype == torch.bfloat16 else _TL_DTYPES[layout.dtype]
        meta = dict(BITS=fmt.bits, PACK=fmt.pack, GS=fmt.group_size, QUANT_META=fmt.quant_meta,
                    SCALE_GROUP=fmt.scale_group, SHARED=shared, SLOTS=fmt.pack if shared else 1, ROUND=round_dtype)
        return fmt, (fmt.out_features, fmt.in_features, fmt.packed_rows, rows_per_slot), meta

    @staticmethod
    def dot_constants(dtype: torch.dtype) -> dict:
        """`tl.dot` in the compute dtype (fp32: exact products, not TF32's); fp32 in the interpreter."""
        dot_dtype = tl.float32 if INTERPRET or dtype == torch.float32 else _TL_DTYPES[dtype]
        return dict(DOT_DTYPE=dot_dtype, DOT_PRECISION="ieee" if dot_dtype == tl.float32 else "tf32")

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
        x = x.contiguous()
        out = torch.empty(x.shape[0], layout.shape[0], dtype=layout.dtype, device=x.device)  # [T, N]
        if x.shape[0] == 0:
            return out
        launches, weight = self.plan(x, layout, buffer, out, self._sms(x.device))
        with _on_device(x.device):
            for kernel, grid, args, constexprs in launches:
                kernel[grid](*args, **constexprs, num_warps=NUM_WARPS)
            if weight is not None:  # long prefill: the dequantized matrix, then cuBLAS
                torch.mm(x, weight.T, out=out)
        return out

    def plan(self, x: torch.Tensor, layout: MatrixLayout, buffer: torch.Tensor, out: torch.Tensor,
             sms: int) -> tuple[list[tuple], torch.Tensor | None]:
        """The launches (kernel, grid, arguments, constexprs) that compute out = x @ W.T, and the scratch matrix
        that cuBLAS multiplies afterwards (None unless dequantizing). tests/triton_aot.py compiles exactly these."""
        fmt, dims, meta = self.constants(layout)
        ptrs = self._pointers(layout, buffer)
        T, N, K = x.shape[0], dims[0], dims[1]
        launch = plan_launch(fmt, T, sms)
        blocks = dict(BLOCK_R=launch.block_rows, BLOCK_G=launch.block_groups)
        if launch.kernel == "gemv":
            if launch.splits == 1:
                return [(_gemv, launch.grid, (x, out, *ptrs, T, *dims, launch.groups_per_split),
                         {**meta, **blocks, "TOKENS": launch.token_block})], None
            partial = torch.empty(launch.splits, T, N, dtype=torch.float32, device=x.device)  # [splits, T, N]
            return [(_gemv, launch.grid, (x, partial, *ptrs, T, *dims, launch.groups_per_split),
                     {**meta, **blocks, "TOKENS": launch.token_block}),
                    (_sum_splits, (triton.cdiv(T * N, REDUCE_BLOCK),), (partial, out, T * N),
                     {"SPLITS": launch.splits, "BLOCK": REDUCE_BLOCK})], None
        if launch.kernel == "qmm":
            return [(_qmm, launch.grid, (x, out, *ptrs, T, *dims),
                     {**meta, **self.dot_constants(layout.dtype), **blocks, "BLOCK_M": launch.token_block})], None
        weight = self._scratch_for(x.device, N * K, layout.dtype).view(N, K)
        return [(_dequantize, launch.grid, (weight, *ptrs, *dims), {**meta, **blocks})], weight

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
        """Compile every kernel variant `layout` can launch (Triton compiles each on its first launch)."""
        device = torch.device(device)
        buffer = torch.zeros(layout.start + layout.nbytes, dtype=torch.uint8, device=device)
        fmt = self.constants(layout)[0]
        for tokens in warm_up_tokens(fmt, self._sms(device)):
            self.linear(torch.zeros(tokens, layout.shape[1], dtype=layout.dtype, device=device), layout, buffer)
