"""CPU kernels: a small C++ kernel (cpu_kernel.cpp) built with the system's g++ for this machine, called via ctypes.

Decode (at most `GEMV_MAX_TOKENS` tokens): a GEMV that takes x and returns y in the compute dtype, reads each
packed byte once for all of a call's tokens and accumulates in fp32, OpenMP over output rows. It multiplies
either in fp32 (x converted once per call; weights dequantized in registers, w = (q - z) * s, the reference's
formula; on AVX-512 CPUs with VBMI, 16-wide groups of byte codes run one group per vector lane, so the scale
multiply leaves the inner loop) or, for bfloat16 activations on a CPU with AVX512-BF16, with bfloat16 dot products
(on the codes, a group per lane, or on the reference's own bfloat16 weights), or with integer dot products on x
quantized once per call to int16 per 16 inputs (cpu_kernel_int.h), which `CPUKernels(int_activations="auto")`,
the default, takes for float16 x and for bfloat16 x but where the bfloat16 dot products on the reference's weights
run; `CPUKernels.multiplies_in` says which. Prefill: a one-pass dequantize into the full matrix in the compute
dtype, bit for bit what the reference builds, then BLAS.

Why hand-written rather than `torch.compile`: inductor's loop for the group-sum formulation ends every group of
16 weights with a horizontal sum, about one cycle per weight; dequantizing into vector registers and summing
once per row runs several times faster, and a few hundred lines of C++ compile in about a second where inductor took
seconds per matrix shape. The library is built once per packed format (bits, group size) with -march=native and
cached on disk (`OFFLOAD_ENGINE_CACHE`, else ~/.cache/offload_engine), keyed by source, flags, compiler and CPU.
Each build records the library's size and sha256 beside it (`<name>.so.sha256`); a cached library that does not
match (truncated, overwritten, half-written) is rebuilt with a warning naming it, never loaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..quantize import MatrixLayout
from .packing import PackedFormat

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
HEADERS = [SOURCE.with_name(name) for name in (  # SOURCE includes them (cpu_kernel_int.h the last)
    "cpu_kernel_common.h", "cpu_kernel_bf16.h", "cpu_kernel_groups.h", "cpu_kernel_int.h", "cpu_kernel_int_vectors.h")]
# Beyond this many tokens, dequantize + BLAS is faster: the GEMV reads each block of rows once for all of a call's
# tokens, and measured crossovers on the Mixtral expert matrices lie between 64 and 128 tokens in float32 and in
# bfloat16 (on a CPU with AVX512-BF16, whose BLAS is fast); scripts/bench_kernels.py --crossover.
GEMV_MAX_TOKENS = 64
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
WORD_TYPES = {1: "uint8_t", 2: "uint8_t", 3: "uint32_t", 4: "uint8_t", 8: "uint8_t"}
SMALL_WORK = 1 << 16  # weights x tokens below which one thread beats waking the others


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "g++", "c++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


@functools.cache
def compiler_problem() -> str | None:
    """Why the CPU kernel cannot be built here (None if it can): it needs g++ (or $CXX) on the PATH."""
    return None if _compiler() else "no C++ compiler ($CXX, g++ or c++) on the PATH"


def _cache_dir() -> Path:
    root = os.environ.get("OFFLOAD_ENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "offload_engine")
    return Path(root) / "cpu_kernels"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux) or its name."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def _record_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _fingerprint(library: Path) -> str:
    """What the build records beside a library, to check it against before loading: its size and sha256."""
    data = library.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n"


def _damage(library: Path) -> str | None:
    """Why the cached `library` must not be loaded, or None when it is what its build recorded. Loading a
    truncated library kills the process with SIGBUS (no Python error to catch), so this runs before every load."""
    try:
        recorded = _record_path(library).read_text()
    except (OSError, UnicodeDecodeError):
        return "no size and checksum recorded beside it: an interrupted build, or one by an older version"
    try:
        actual = _fingerprint(library)
    except OSError as e:
        return f"unreadable: {e}"
    if recorded == actual:
        return None
    size = actual.split()[0]
    expected = recorded.split()[0] if recorded.split() else "?"
    return (f"{size} bytes, the build recorded {expected}" if size != expected
            else "its checksum differs from the one its build recorded")


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# Tried in order until one compiles: OpenMP may be missing (Apple's clang, a clang without libomp: the kernel then
# runs on one thread), and a compiler may not know -march=native (it then targets the baseline ISA).
FLAG_CHOICES = (["-march=native", "-fopenmp"], ["-march=native"], [])


def _build(bits: int, group_size: int) -> Path:
    """The shared library for one packed format, compiled now unless a matching one is cached.
    $OFFLOAD_ENGINE_CXXFLAGS adds flags to every attempt (e.g. -mno-f16c, to test the portable float16 code)."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(compiler_problem())
    pack = 10 if bits == 3 else 8 // bits
    common = ["-O3", "-shared", "-fPIC", "-std=c++17", f"-DWORD={WORD_TYPES[bits]}", f"-DBITS={bits}",
              f"-DPACK={pack}", f"-DGROUP={group_size}", *os.environ.get("OFFLOAD_ENGINE_CXXFLAGS", "").split()]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    sources = [path.read_text() for path in (SOURCE, *HEADERS)]
    key = hashlib.sha256("\0".join([*sources, *common, repr(FLAG_CHOICES), version, _cpu_id()]).encode())
    target = _cache_dir() / f"qmatmul_b{bits}_g{group_size}_{key.hexdigest()[:16]}.so"
    if target.exists():
        damage = _damage(target)
        if damage is None:
            return target
        warnings.warn(f"the cached CPU kernel library {target} is damaged ({damage}); rebuilding it",
                      RuntimeWarning, stacklevel=2)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name, then rename: a concurrent or interrupted build never leaves a partial library,
    # and a process that has the old file mapped keeps its own copy (a file truncated in place would SIGBUS it).
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        errors = []
        for flags in FLAG_CHOICES:
            result = subprocess.run([compiler, *common, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if result.returncode == 0:
                record = _fingerprint(Path(tmp))
                os.replace(tmp, target)
                _write_atomically(_record_path(target), record)
                return target
            errors.append(result.stderr.strip())
        raise RuntimeError(f"{compiler} failed to compile {SOURCE.name} for {bits}-bit group {group_size}: "
                           f"{errors[0][-2000:]}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.cache
def _library(bits: int, group_size: int) -> ctypes.CDLL:
    path = _build(bits, group_size)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise RuntimeError(f"cannot load the CPU kernel library {path} ({e}); delete it to have it rebuilt") from e
    pointer, i32 = ctypes.c_void_p, ctypes.c_int
    # base, offsets, shape, x, T, y, threads, how (HOW)
    lib.gemv.argtypes = [pointer, pointer, pointer, pointer, i32, pointer, i32, i32]
    lib.gemv.restype = None
    lib.multiplies.argtypes = [pointer, i32]  # shape, how
    lib.multiplies.restype = i32
    lib.dequantize.argtypes = [pointer, pointer, pointer, pointer, i32]  # base, offsets, shape, out, threads
    lib.dequantize.restype = None
    return lib


SEGMENTS = ("codes", "scale_q", "scale_range", "zero_q", "zero_range", "scale", "zero")  # cpu_kernel.cpp's order


@dataclass(frozen=True)
class _Plan:
    """What every call on one matrix layout passes, prepared once: the library for its format and two small
    int64 arrays the C++ side reads (segment offsets; dtype and shape), so a call converts few Python values."""

    lib: ctypes.CDLL
    offsets: ctypes.Array  # byte offset of each of SEGMENTS in the buffer, -1 where absent
    shape: ctypes.Array  # dtype code, N, K, S
    end: int  # bytes the buffer must hold
    threads_from: int  # tokens from which the matmul is worth every thread
    float_path: int  # the library's path code (PATHS) for this matrix without an integer request


_PLANS: dict[int, _Plan] = {}  # by id() of a live layout; an entry goes when its layout does


def _plan(layout: MatrixLayout) -> _Plan:
    """The call plan for `layout`, prepared on first use. Looked up by identity: hashing a frozen layout (its
    segments and spec) on every matmul cost ~4 us, a tenth of a small expert's matmul. The entry is dropped when
    the layout is collected, so an id is never reused for another layout while its entry stands."""
    plan = _PLANS.get(id(layout))
    if plan is None:
        fmt = PackedFormat.of(layout)
        where = {s.name: s.offset for s in layout.segments}
        offsets = (ctypes.c_int64 * len(SEGMENTS))(*(where.get(name, -1) for name in SEGMENTS))
        shape = (ctypes.c_int64 * 4)(DTYPE_CODES[layout.dtype], fmt.out_features, fmt.in_features, fmt.packed_rows)
        weights = fmt.out_features * fmt.in_features
        lib = _library(layout.spec.bits, layout.spec.group_size)
        plan = _PLANS[id(layout)] = _Plan(lib, offsets, shape, layout.start + layout.nbytes,
                                          -(-SMALL_WORK // weights), lib.multiplies(shape, HOW["as built"]))
        weakref.finalize(layout, _PLANS.pop, id(layout), None)
    return plan


# What cpu_kernel.cpp's gemv is asked for (its `how`), and the paths it reports taking (its `multiplies`).
HOW = {"as built": 0, "fp32": 1, "int16": 2, "int8": 3}
PATHS = {0: "fp32", 1: "bfloat16 dot products on the reference's weights", 2: "bfloat16 dot products on the codes",
         3: "int16 dot products (x quantized per 16 inputs)", 4: "int8 dot products (x quantized per 16 inputs)"}
INT_ACTIVATIONS = ("auto", "off", "int16", "int8")
# The one float path (PATHS) that "auto" keeps for bfloat16 x: on a Mixtral 2-bit g64 matrix (one thread) it ran
# 1.4x (1 token) to 1.7x (4 tokens) faster than int16, which beats every other path (BENCHMARKS.md §1).
BF16_REFERENCE_WEIGHTS = 1


class CPUKernels:
    """Quantized matmuls for CPU tensors through the compiled C++ kernel.

    `int_activations` says when the decode GEMV quantizes x to integers (cpu_kernel_int.h: one scale per 16
    inputs, integer dot products with the codes; byte codes in groups of a multiple of 16, rows sharing words):
      * "auto" (the default): float16 x in int16, whose rounding (at most 1/65534 of the largest |x| among 16
        inputs) leaves outputs ~25x closer to the exact product than the float16 reference's own roundings (1.4-2e-5
        of the largest output vs 4.3-4.7e-4, BENCHMARKS.md §1), and is ~1.3-1.55x faster than the fp32 path;
        bfloat16 x in int16 too (its error ~1/200 of the bfloat16 reference's, 3.3-4e-3), faster than the exact
        bfloat16 dot products on the codes at 1-4 tokens (1.03-1.6x on a Mixtral expert) and than the fp32 path,
        except where the matrix takes the bfloat16 dot products on the reference's weights (AVX512-BF16, 1-2-bit
        codes in groups other than 16, or no VBMI), which int16 does not beat; float32 never (exact paths);
      * "off": the float paths only; "int16": int16 for every dtype;
      * "int8": int8 for every dtype, an opt-in trade of accuracy for speed (errors ~1.5x the bfloat16
        reference's; tests/test_kernels_int.py checks the bound x's rounding implies). Not a config key.
    `fp32_only` forces the fp32 path (to test and time it against the others)."""

    name = "fused-cpu"

    def __init__(self, fp32_only: bool = False, int_activations: str = "auto") -> None:
        if int_activations not in INT_ACTIVATIONS:
            raise ValueError(f"int_activations must be one of {', '.join(INT_ACTIVATIONS)}, got {int_activations!r}")
        if fp32_only and int_activations in ("int16", "int8"):
            raise ValueError(f"fp32_only contradicts int_activations={int_activations!r}")
        self.fp32_only = fp32_only
        self.int_activations = int_activations
        # Prefill dequantizes into a reused buffer: a fresh one would cost page faults on every call (~65 ms for
        # a Mixtral expert matrix in float32, half the dequantize). One per thread, since engines share kernels.
        self._scratch = threading.local()

    def _weight_buffer(self, layout: MatrixLayout) -> torch.Tensor:
        numel, dtype = layout.shape[0] * layout.shape[1], layout.dtype
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = self._scratch.buffer = torch.empty(numel, dtype=dtype)
        return buffer[:numel].view(layout.shape)  # [N, K]

    def supports(self, layout: MatrixLayout) -> str | None:
        """None if this layout runs fused, else why not."""
        if layout.spec.bits is None:
            return "not quantized"
        if layout.dtype not in DTYPE_CODES:
            return f"no fused CPU kernel for compute dtype {layout.dtype}"
        try:
            PackedFormat.of(layout)
        except ValueError as e:
            return str(e)
        if layout.spec.group_size % 2:
            return f"the fused CPU kernel needs an even group_size, got {layout.spec.group_size}"
        return None

    def linear(self, x: torch.Tensor, layout: MatrixLayout, buffer: torch.Tensor) -> torch.Tensor:
        """y = x @ W.T for W in `layout` within `buffer`.  x: [T, K] -> [T, N]."""
        if layout.spec.bits is None:
            return F.linear(x, layout.views(buffer)["weight"])
        plan = _plan(layout)
        if buffer.device.type != "cpu" or buffer.dtype != torch.uint8 or not buffer.is_contiguous():
            raise ValueError("the fused CPU kernel reads a contiguous uint8 CPU buffer")
        if buffer.numel() < plan.end:  # the C++ code would read past its end
            raise ValueError(f"buffer of {buffer.numel()} bytes is too small for a matrix layout ending at byte "
                             f"{plan.end}")
        (out_features, in_features), tokens = layout.shape, x.shape[0]
        if x.dim() != 2 or x.shape[1] != in_features:
            raise ValueError(f"x must be [tokens, {in_features}] for a matrix of shape {layout.shape}, "
                             f"got {list(x.shape)}")
        threads = torch.get_num_threads() if tokens >= plan.threads_from else 1
        if tokens > GEMV_MAX_TOKENS:
            weight = self._weight_buffer(layout)  # [N, K], what the reference dequantizes to
            plan.lib.dequantize(buffer.data_ptr(), plan.offsets, plan.shape, weight.data_ptr(), threads)
            return F.linear(x.to(layout.dtype), weight)  # y in the compute dtype, as the GEMV returns it
        x = x.to(layout.dtype).contiguous()  # [T, K]
        y = torch.empty(tokens, out_features, dtype=layout.dtype)  # [T, N]
        plan.lib.gemv(buffer.data_ptr(), plan.offsets, plan.shape, x.data_ptr(), tokens, y.data_ptr(), threads,
                      self._how(plan, layout.dtype))
        return y

    def _how(self, plan: _Plan, dtype: torch.dtype) -> int:
        """What to ask gemv for (HOW) under this instance's settings; it falls back where a path does not run."""
        if self.fp32_only:
            return HOW["fp32"]
        mode = self.int_activations
        if mode == "auto":
            wanted = dtype == torch.float16 or (dtype == torch.bfloat16 and plan.float_path != BF16_REFERENCE_WEIGHTS)
            return HOW["int16"] if wanted else HOW["as built"]
        return HOW["as built"] if mode == "off" else HOW[mode]

    def multiplies_in(self, layout: MatrixLayout, tokens: int = 1) -> str:
        """How the decode GEMV multiplies `layout` at `tokens` tokens on this CPU (one of PATHS): "fp32" (x
        converted once), "bfloat16 dot products on the codes" (bfloat16 x, AVX512-BF16 and VBMI, groups of 16,
        1-4-bit codes: exact products of codes and x, scales applied per group in fp32), "bfloat16 dot products on
        the reference's weights" (1- or 2-bit codes: its bfloat16 weights, tabled) or "int16"/"int8 dot products"
        (x quantized, see the class's docstring)."""
        plan = _plan(layout)
        if tokens > GEMV_MAX_TOKENS:
            return PATHS[0]
        return PATHS[plan.lib.multiplies(plan.shape, self._how(plan, layout.dtype))]

    def warm_up(self, layout: MatrixLayout, device: torch.device) -> None:
        """Build (or load from the disk cache) the library `layout` needs, so the first reply does not wait."""
        if layout.spec.bits is not None:
            _library(layout.spec.bits, layout.spec.group_size)


@functools.cache
def shared_cpu_kernels() -> CPUKernels:
    """One instance per process (the libraries are cached per format anyway)."""
    return CPUKernels()
