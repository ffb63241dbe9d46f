"""How the Triton kernels tile a quantized matrix, as plain arithmetic (no Triton import): which kernel a call runs,
its grid and blocks (`plan_launch`, used by the launcher in triton_kernels.py), and from the same index arithmetic
the bytes every program loads and stores (`kernel_bytes`, checked against the interpreter's real loads by
tests/test_triton_kernels.py) and the device-memory traffic of a call (`fused_traffic`).

Row tiling. hqq packs PACK codes per word along the group axis (packing.py). When the codes tensor has R = S / G
word rows per slot (N a multiple of PACK: Mixtral's 2- and 4-bit matrices), word row p = r * G + k // g holds the
codes of output rows r, r + R, ..., r + (PACK - 1) R. A program then owns a run of *base rows* r and all PACK
slots of each ("shared" rows): every byte it loads serves PACK output rows, and no other program loads it. Other
layouts (3-bit's 10 codes per int32 word, or N not a multiple of PACK) are tiled by output rows, each reading its
own words: correct, but every word is loaded by up to PACK programs (`kernel_bytes` counts it that many times).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

from .packing import PackedFormat

GEMV_MAX_TOKENS = 8  # up to this many tokens: the GEMV (all tokens in one pass over the codes)
DOT_MAX_TOKENS = 64  # up to this many: tiled tl.dot; beyond, dequantize into a scratch matrix + cuBLAS
TILE_ROWS = 32  # output rows per GEMV / dequantize program
DOT_ROWS = 64  # output rows per tl.dot program
BLOCK_K = 128  # weights along K per step
SCALE_RANGE_BYTES = 4  # one (min, step) float16 pair per SCALE_GROUP scales
REDUCE_BLOCK = 1024  # elements per program of the split-K reduction


@dataclass(frozen=True)
class Launch:
    """One quantized matmul as the launcher runs it."""

    kernel: str  # "gemv" | "qmm" | "dequantize"
    tokens: int  # T
    shared: bool  # programs own base rows and all their slots (shares_rows)
    slots: int  # output rows per base row: PACK when rows are shared, else 1
    base_rows: int  # R (shared) or N
    block_rows: int  # base rows per program
    block_groups: int  # groups per K step (BLOCK_G)
    groups_per_split: int  # gemv: the K slice of one program (a multiple of block_groups); else every group
    splits: int  # gemv: K slices, summed by a second kernel when > 1
    token_block: int  # gemv: tokens per program (a power of two >= T); qmm: BLOCK_M

    @property
    def row_blocks(self) -> int:
        return -(-self.base_rows // self.block_rows)

    @property
    def grid(self) -> tuple[int, int]:
        """qmm: (token blocks, row blocks); gemv and dequantize: (row blocks, K slices)."""
        if self.kernel == "qmm":
            return -(-self.tokens // self.token_block), self.row_blocks
        return self.row_blocks, self.splits

    @property
    def launches(self) -> int:
        """Kernels per call: the split-K GEMV adds its reduction; dequantize is followed by cuBLAS's matmul."""
        return 2 if self.kernel == "dequantize" or (self.kernel == "gemv" and self.splits > 1) else 1


def shares_rows(fmt: PackedFormat) -> bool:
    """Whether PACK output rows share each word row (see the module docstring)."""
    return fmt.packed_rows % fmt.groups_per_row == 0 and fmt.pack & (fmt.pack - 1) == 0


@functools.cache  # called for every matmul
def plan_launch(fmt: PackedFormat, tokens: int, sms: int) -> Launch:
    """The kernel, blocks and K split for `tokens` rows of x on a GPU with `sms` streaming multiprocessors."""
    G = fmt.groups_per_row
    shared = shares_rows(fmt)
    slots = fmt.pack if shared else 1
    base_rows = fmt.packed_rows // G if shared else fmt.out_features
    block_groups = max(1, BLOCK_K // fmt.group_size)
    steps = -(-G // block_groups)
    if tokens > DOT_MAX_TOKENS:
        return Launch("dequantize", tokens, shared, slots, base_rows, max(1, TILE_ROWS // slots), block_groups,
                      block_groups, steps, 0)
    if tokens > GEMV_MAX_TOKENS:
        block_m = 16 if tokens <= 16 else (32 if tokens <= 32 else 64)
        return Launch("qmm", tokens, shared, slots, base_rows, max(1, DOT_ROWS // slots), block_groups,
                      steps * block_groups, 1, block_m)
    block_rows = max(1, TILE_ROWS // slots)
    row_blocks = -(-base_rows // block_rows)
    splits = max(1, min(-(-4 * sms // row_blocks), steps))  # enough programs to give every SM ~4
    per_split = -(-steps // splits) * block_groups
    return Launch("gemv", tokens, shared, slots, base_rows, block_rows, block_groups, per_split, -(-G // per_split),
                  1 << (tokens - 1).bit_length())


def warm_up_tokens(fmt: PackedFormat, sms: int) -> list[int]:
    """One token count per kernel variant a layout can launch: per kernel and token block (the constexprs that
    depend on T; the K split depends on the layout and the GPU alone)."""
    first: dict[tuple[str, int], int] = {}
    for tokens in range(1, DOT_MAX_TOKENS + 2):
        launch = plan_launch(fmt, tokens, sms)
        first.setdefault((launch.kernel, launch.token_block), tokens)
    return list(first.values())


@dataclass(frozen=True)
class KernelBytes:
    """Bytes a call's kernels load and store, per buffer (a segment name of the layout, "x", "out", or "scratch":
    the split-K partial sums, the dequantized matrix), summed over programs; within one program an address counts
    once (what a program loads again comes from its cache)."""

    loads: dict[str, int]
    stores: dict[str, int]
    launches: int


def _distinct(intervals: list[tuple[int, int]], block: int = 1, modulus: int | None = None) -> int:
    """How many distinct values v // block the half-open integer intervals cover (v taken mod `modulus` first)."""
    pieces = []
    for lo, hi in intervals:
        if modulus is None:
            pieces.append((lo, hi))
        elif hi - lo >= modulus:
            pieces.append((0, modulus))
        else:
            lo, hi = lo % modulus, lo % modulus + hi - lo
            pieces += [(lo, hi)] if hi <= modulus else [(lo, modulus), (0, hi - modulus)]
    total, end = 0, None
    for first, last in sorted((lo // block, (hi - 1) // block + 1) for lo, hi in pieces if hi > lo):
        if end is None or first >= end:
            total += last - first
        elif last > end:
            total += last - end
        end = last if end is None else max(end, last)
    return total


def _program(fmt: PackedFormat, launch: Launch, itemsize: int, base: int, g_lo: int, g_hi: int,
             tokens: int, loads: Counter, stores: Counter) -> None:
    """Add what one program (base rows from `base`, groups [g_lo, g_hi), `tokens` live tokens) loads and stores."""
    G, N, S, GS = fmt.groups_per_row, fmt.out_features, fmt.packed_rows, fmt.group_size
    live = min(launch.block_rows, launch.base_rows - base)
    runs = [(q * launch.base_rows + base, min(q * launch.base_rows + base + live, N)) for q in range(launch.slots)]
    runs = [(lo, hi) for lo, hi in runs if hi > lo]  # output rows, as runs of consecutive rows
    rows = sum(hi - lo for lo, hi in runs)
    groups = g_hi - g_lo
    if g_lo == 0 and g_hi == G:  # group indices i = n * G + g of the program's rows
        spans = [(lo * G, hi * G) for lo, hi in runs]
    else:
        spans = [(n * G + g_lo, n * G + g_hi) for lo, hi in runs for n in range(lo, hi)]
    if launch.shared:
        loads["codes"] += live * groups * GS * fmt.word_bytes  # word rows base * G + g: one per base row and group
    else:
        loads["codes"] += _distinct(spans, modulus=S) * GS * fmt.word_bytes  # word row i % S of group i
    if fmt.quant_meta:
        loads["scale_q"] += rows * groups
        loads["zero_q"] += rows * groups
        loads["scale_range"] += _distinct(spans, block=fmt.scale_group) * SCALE_RANGE_BYTES
        loads["zero_range"] += 8
    else:
        loads["scale"] += rows * groups * 2
        loads["zero"] += rows * groups * 2
    if launch.kernel == "dequantize":
        stores["scratch"] += rows * groups * GS * itemsize  # the dequantized matrix
        return
    loads["x"] += tokens * groups * GS * itemsize
    partial = launch.kernel == "gemv" and launch.splits > 1  # fp32 partial sums of its K slice
    stores["scratch" if partial else "out"] += rows * tokens * (4 if partial else itemsize)


@functools.cache
def kernel_bytes(fmt: PackedFormat, itemsize: int, tokens: int, sms: int) -> KernelBytes:
    """What the Triton kernels of one `linear` call of `tokens` tokens load and store, program by program, from
    the index arithmetic of `plan_launch` and the kernels (itemsize: of the compute dtype). cuBLAS's matmul
    after `dequantize` is not included."""
    launch = plan_launch(fmt, tokens, sms)
    loads, stores = Counter(), Counter()
    G = fmt.groups_per_row
    for block in range(launch.row_blocks):
        base = block * launch.block_rows
        for k_slice in range(launch.splits):
            g_lo = k_slice * launch.groups_per_split
            g_hi = min(G, g_lo + launch.groups_per_split)
            if launch.kernel == "qmm":
                for t_lo in range(0, tokens, launch.token_block):
                    _program(fmt, launch, itemsize, base, g_lo, g_hi, min(launch.token_block, tokens - t_lo),
                             loads, stores)
            else:
                _program(fmt, launch, itemsize, base, g_lo, g_hi, tokens, loads, stores)
    if launch.kernel == "gemv" and launch.splits > 1:  # the reduction: every partial sum read once, y written
        loads["scratch"] += launch.splits * tokens * fmt.out_features * 4
        stores["out"] += tokens * fmt.out_features * itemsize
    return KernelBytes(dict(loads), dict(stores), launch.launches)
