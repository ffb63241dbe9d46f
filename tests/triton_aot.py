"""Compile every Triton kernel variant the engine would launch on a T4 (sm_75) and on an A100 (sm_80), without a GPU.

Run as a script (tests/test_triton_kernels.py does, in a process without TRITON_INTERPRET): Triton's own
compiler lowers each kernel to PTX and assembles it with the ptxas its wheel ships, so a kernel that would fail
to compile on the GPU fails here, although nothing runs. The variants come from the launcher itself
(`TritonKernels.plan` on meta tensors: the same kernels, grids, arguments and constexprs a real call uses) for
  * every packaged config's quantized matrices at Mixtral-8x7B's shapes (experts and attention), in every dtype
    the architecture runs: float16 and float32 on sm_75 (bfloat16 needs compute capability 8.0, and `supports`
    refuses it below), all three on sm_80; each at one token count per variant (geometry.warm_up_tokens), with
    the GPU's SM count deciding the K split (T4: 40, A100: 108);
  * one matrix per other packed format (1-, 3- and 8-bit codes, float16 scales, rows that share no words), in
    float16, once per kernel, so that each path of `_dequant_tile` is built for both architectures.
Arguments are specialised as Triton's JIT specialises them (pointers and integers divisible by 16, integers equal
to 1 become constants) unless the kernel says `do_not_specialize`; a variant whose constants and argument types
recur with other alignments is compiled once. Prints one line per architecture and exits non-zero on the first
failure, naming the variant.

    python tests/triton_aot.py [--arch 75 80] [--jobs N] [--list]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import offload_engine
from offload_engine.config import QuantSpec
from offload_engine.kernels.capability import BFLOAT16_CAPABILITY
from offload_engine.kernels.geometry import GEMV_MAX_TOKENS, warm_up_tokens
from offload_engine.kernels.triton_kernels import NUM_WARPS, TritonKernels
from offload_engine.quantize import MatrixLayout

SMS = {75: 40, 80: 108}  # Tesla T4, A100
TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8",
         torch.int32: "i32"}
MIXTRAL = {"w1/w3": (14336, 4096), "w2": (4096, 14336), "q/o_proj": (4096, 4096), "k/v_proj": (1024, 4096)}
# Formats no packaged config uses: (bits, group_size, quant_meta, shape). 98 rows are not a multiple of 4, so
# 2-bit words hold rows of different programs (the row tiling that reads each row's own words).
OTHER_FORMATS = [(1, 32, True, (128, 256)), (8, 32, True, (128, 256)), (4, 64, False, (128, 256)),
                 (2, 16, True, (98, 256)), (3, 16, False, (128, 256))]


def packaged_layouts() -> set[MatrixLayout]:
    """The quantized matrices of every packaged config at Mixtral-8x7B's shapes (dtype float16; set per arch)."""
    layouts = set()
    for name in ("t4-16gb", "12gb", "8gb", "24gb", "cpu"):
        quant = offload_engine.load_config(name).quant
        for matrix, shape in MIXTRAL.items():
            spec = quant.attention if "proj" in matrix else quant.experts
            if spec.bits is not None:
                layouts.add(MatrixLayout.build(shape, spec, torch.float16))
    return layouts


@functools.cache  # per process: the workers rebuild the list rather than pickle Triton's kernels
def variants(arch: int) -> list[tuple]:
    """(kernel, signature, constants, attrs) of every launch, each constexpr variant once."""
    dtypes = [torch.float16, torch.float32] + ([torch.bfloat16] if arch >= BFLOAT16_CAPABILITY[0] * 10 else [])
    others = {MatrixLayout.build(shape, QuantSpec(bits, group, quant_meta=meta), torch.float16)
              for bits, group, meta, shape in OTHER_FORMATS}
    kernels, found = TritonKernels("meta"), {}
    for layout in sorted(packaged_layouts() | others, key=str):
        fmt = kernels.constants(layout)[0]
        tokens = warm_up_tokens(fmt, SMS[arch])
        if layout in others:  # one launch per kernel: the GEMV, tl.dot and dequantize paths
            tokens = [tokens[0], next(t for t in tokens if t > GEMV_MAX_TOKENS), tokens[-1]]
        for dtype in dtypes if layout not in others else [torch.float16]:
            layout = MatrixLayout(layout.shape, layout.spec, dtype, layout.segments, layout.nbytes)
            assert kernels.supports(layout) is None, kernels.supports(layout)
            buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device="meta")
            for t in tokens:
                x = torch.empty(t, layout.shape[1], dtype=dtype, device="meta")
                out = torch.empty(t, layout.shape[0], dtype=dtype, device="meta")
                for fn, _, args, constexprs in kernels.plan(x, layout, buffer, out, SMS[arch])[0]:
                    variant = specialise(fn, args, constexprs)
                    found.setdefault((fn.__name__, str(variant[1]), str(variant[2])), variant)
    return list(found.values())


def describe(arch: int, variant: tuple) -> str:
    fn, _, constants, _ = variant
    return f"sm_{arch} {fn.__name__} {' '.join(f'{k}={v}' for k, v in constants.items())}"


def compile_variant(arch: int, index: int) -> str | None:
    """Compile one variant for `arch`; None, or what failed."""
    fn, signature, constants, attrs = variant = variants(arch)[index]
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": NUM_WARPS})
        assert compiled.asm["cubin"], "no cubin"
    except Exception as e:
        return f"FAILED {describe(arch, variant)}: {type(e).__name__}: {e}"
    return None


def specialise(fn, args: tuple, constexprs: dict):
    """The signature, constants and attributes Triton's JIT would compile `fn` with for these arguments."""
    constants, signature, attrs = dict(constexprs), {}, {}
    params = [p for p in fn.params if not p.is_constexpr]
    for param, value in zip(params, args):
        if isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TYPES[value.dtype]
            if not param.do_not_specialize_on_alignment:  # meta tensors sit at 0; real buffers are 16-aligned
                attrs[(param.num,)] = [["tt.divisibility", 16]]
        elif value == 1 and not param.do_not_specialize:
            constants[param.name] = 1
        else:
            signature[param.name] = "i32"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(param.num,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in constants})
    return fn, signature, constants, attrs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[75, 80], choices=sorted(SMS))
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiler processes")
    parser.add_argument("--list", action="store_true", help="print the variants, compile nothing")
    args = parser.parse_args()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        for arch in args.arch:
            found = variants(arch)
            if args.list:
                print("\n".join(describe(arch, variant) for variant in found))
                continue
            start = time.perf_counter()
            for failure in pool.map(compile_variant, [arch] * len(found), range(len(found))):
                if failure:
                    print(failure, flush=True)
                    return 1
            print(f"compiled {len(found)} kernel variants for sm_{arch} in {time.perf_counter() - start:.0f} s",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
