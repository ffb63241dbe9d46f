"""How the Triton GEMV splits a matrix's K dimension across programs, and the bytes a fused GEMV moves: pure
arithmetic (no Triton), shared by the launcher (triton_kernels.py) and the throughput model (throughput.py)."""

from __future__ import annotations

from ..quantize import MatrixLayout

GEMV_BLOCK_N, GEMV_BLOCK_K = 32, 128  # rows per program, weights along K per step (Triton GEMV)


def gemv_k_splits(out_features: int, in_features: int, group_size: int, sms: int) -> int:
    """How many K slices the Triton GEMV splits a matrix into: enough programs to give each SM ~4, never slicing
    K thinner than one step."""
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
