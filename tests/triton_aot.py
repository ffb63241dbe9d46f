"""Compile every Triton kernel variant ahead of time for real NVIDIA targets, without a GPU.

Run as a script (tests/test_triton_kernels.py does, in a process without TRITON_INTERPRET): Triton's own
compiler lowers each kernel to PTX and assembles it with the ptxas its wheel ships, so a kernel that would fail
to compile on a T4 (sm_75) or an A100/H100-class GPU (sm_80/sm_90) fails here, although nothing runs.
Prints one line per variant and exits non-zero on the first failure.
"""

from __future__ import annotations

import itertools
import sys

import triton
import triton.language as tl
from hqq.core.quantize import Quantizer
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from offload_engine.kernels import triton_kernels as tk
from offload_engine.kernels.packing import _WORDS

TL = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
KERNELS = ("gemv", "qmm", "dequantize")


def signature(kernel: str, dtype: str, word: str, quant_meta: bool) -> dict[str, str]:
    x, out = f"*{dtype}", ("*fp32" if kernel == "gemv" else f"*{dtype}")
    scales = ("*u8", "*fp16", "*u8", "*fp32") if quant_meta else ("*fp16", "*fp16", "*fp16", "*fp16")
    pointers = {"codes_ptr": word, **dict(zip(("s_ptr", "srange_ptr", "z_ptr", "zrange_ptr"), scales))}
    sizes = {"N": "i32", "K": "i32", "S": "i32", "R": "i32"}
    if kernel == "dequantize":
        return {"out_ptr": out, **pointers, **sizes}
    sig = {"x_ptr": x, "out_ptr": out, **pointers, "T": "i32", **sizes}
    return {**sig, "groups_per_split": "i32"} if kernel == "gemv" else sig


def main() -> int:
    cases = 0
    # The T4 (sm_75) runs fp16: every bit width and scale format. Newer GPUs: bf16 and fp32 on two bit widths
    # (the dtype changes the code; the bit width only the unpacking, covered on sm_75).
    t4 = itertools.product((75,), ("fp16",), (1, 2, 3, 4, 8), (True, False), KERNELS)
    newer = itertools.product((80,), ("bf16", "fp32"), (2, 3), (True, False), KERNELS)
    for arch, dtype, bits, quant_meta, kernel in itertools.chain(t4, newer):
        pack, word_dtype = _WORDS[Quantizer.bit_to_packing[bits]]
        word = "*i32" if word_dtype.itemsize == 4 else "*u8"
        group = 16 if bits <= 2 else 64
        constexprs = dict(BITS=bits, PACK=pack, GS=group, QUANT_META=quant_meta, SCALE_GROUP=128,
                          ALIGNED=bits != 3, ROUND=TL[dtype], BLOCK_N=32 if kernel != "qmm" else 64,
                          BLOCK_G=max(1, tk.BLOCK_K // group))
        if kernel == "qmm":
            constexprs.update(DOT_DTYPE=TL[dtype], DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_M=16)
        fn = {"gemv": tk._gemv, "qmm": tk._qmm, "dequantize": tk._dequantize}[kernel]
        sig = {**signature(kernel, dtype, word, quant_meta), **{k: "constexpr" for k in constexprs}}
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32))
        except Exception as e:  # report which variant, then fail
            print(f"FAILED sm_{arch} {kernel} {dtype} {bits}-bit quant_meta={quant_meta}: {e}", flush=True)
            return 1
        assert compiled.asm["cubin"], "no cubin"
        cases += 1
    print(f"compiled {cases} kernel variants for sm_75 and sm_80")
    return 0


if __name__ == "__main__":
    sys.exit(main())
