"""Quantized matmul kernels, timed one by one: the reference (dequantize + F.linear) against the fused backend.

    python scripts/bench_kernels.py [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--tokens 1]
                                    [--repeats 10] [--threads N] [--sweep [--cpu-time]] [--crossover] [--traffic]
                                    [--int-activations auto|off|int16|int8]

Times, on Mixtral-8x7B's shapes (random packed bytes: speed does not depend on the values):
  * each matrix of one expert at 2-bit g16 with 8-bit scales/zeros (w1/w3 14336x4096, w2 4096x14336) and the
    4-bit g64 attention projections (q/o 4096x4096, k/v 1024x4096);
  * one whole expert forward (w1, w3, SwiGLU, w2), the unit the engine runs per token and expert.
For each: milliseconds (best of --repeats after a warm-up that also compiles), the speed-up over the reference,
and the bandwidth achieved on the packed bytes (bytes of the packed matrix / time). On CUDA the last column is
that bandwidth as a share of the GPU's datasheet memory bandwidth (given by --datasheet-gbs or a known table).

`--traffic` times nothing: per Mixtral-8x7B layer, the bytes the Triton kernels load and the launches they make
at --tokens tokens on a GPU with --sms SMs, computed from their index arithmetic (kernels/geometry.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from offload_engine.config import QuantSpec  # noqa: E402
from offload_engine.experts import ExpertLayout, expert_forward  # noqa: E402
from offload_engine.kernels import REFERENCE, select_kernels  # noqa: E402
from offload_engine.quantize import MatrixLayout  # noqa: E402

DATASHEET_GBS = {"T4": 320, "A10": 600, "L4": 300, "A100": 1555, "H100": 3350, "H200": 4800, "3060": 360,
                 "3090": 936, "4090": 1008}


def machine(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def best_ms(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (compiles)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def random_buffer(nbytes: int, layouts: list[MatrixLayout], device: torch.device) -> torch.Tensor:
    buffer = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    for layout in layouts:  # sane scale/zero ranges so the outputs are finite
        views = layout.views(buffer)
        views["scale_range"][:, 0], views["scale_range"][:, 1] = 0.01, 1e-4
        views["zero_range"].copy_(torch.tensor([0.0, 3 / 255]))
    return buffer.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--tokens", type=int, default=1, help="rows of x (1 = a decode step)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--datasheet-gbs", type=float, help="the GPU's memory bandwidth, GB/s")
    parser.add_argument("--crossover", action="store_true",
                        help="CPU: time the GEMV and dequantize + BLAS paths at 1-128 tokens (where to switch)")
    parser.add_argument("--sweep", action="store_true",
                        help="CPU: a whole 2-bit expert in float32, bfloat16 and float16 at 1-4 tokens (medians), "
                             "beside this machine's memory bandwidth and load average")
    parser.add_argument("--cpu-time", action="store_true",
                        help="--sweep on 1 thread, timed by the thread's CPU time (time.thread_time) instead of the "
                             "wall clock: comparable across runs on a machine shared with other jobs")
    parser.add_argument("--traffic", action="store_true",
                        help="computed, no timing: what the Triton kernels load per Mixtral layer (see --sms)")
    parser.add_argument("--sms", type=int, default=40, help="--traffic: streaming multiprocessors (T4: 40)")
    parser.add_argument("--int-activations", default="auto", choices=["auto", "off", "int16", "int8"],
                        help="CPU: when the GEMV quantizes x to integers (CPUKernels(int_activations=...); auto: "
                             "float16 and bfloat16 in int16, except bfloat16 on the tabled reference weights path; "
                             "float32 never)")
    args = parser.parse_args()
    if args.traffic:
        traffic(args.tokens, args.sms)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print("machine:", machine(device))
    print(f"dtype {dtype}; tokens {args.tokens}; Mixtral-8x7B shapes; best of {args.repeats}"
          + (f"; int_activations {args.int_activations}" if device.type == "cpu" else ""))
    datasheet = args.datasheet_gbs
    if datasheet is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        datasheet = next((gbs for key, gbs in DATASHEET_GBS.items() if key in name), None)

    if args.sweep:
        if args.cpu_time and torch.get_num_threads() != 1:
            raise SystemExit("--cpu-time times one thread's CPU time: add --threads 1")
        sweep(args.repeats, device, args.cpu_time, args.int_activations)
        return
    expert = ExpertLayout.build(4096, 14336, QuantSpec(2, 16), dtype)
    attention = {"q/o_proj 4096x4096 (4-bit g64)": MatrixLayout.build((4096, 4096), QuantSpec(4, 64), dtype),
                 "k/v_proj 1024x4096 (4-bit g64)": MatrixLayout.build((1024, 4096), QuantSpec(4, 64), dtype)}
    expert_buffer = random_buffer(expert.nbytes, list(expert.matrices.values()), device)
    cases = [(f"expert {name} {layout.shape[0]}x{layout.shape[1]} (2-bit g16)", layout, expert_buffer)
             for name, layout in expert.matrices.items() if name != "w3"]
    cases += [(name, layout, random_buffer(layout.nbytes, [layout], device)) for name, layout in attention.items()]
    fused = select_kernels("fused", device, [layout for _, layout, _ in cases])
    if fused.name == "fused-cpu":
        from offload_engine.kernels.cpu import CPUKernels

        fused = CPUKernels(int_activations=args.int_activations)
    print(f"fused backend: {fused.name}\n")
    print("| kernel | packed MB | reference ms | fused ms | speed-up | fused GB/s on packed bytes |"
          + (" of datasheet |" if datasheet else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if datasheet else ""))

    def row(name: str, nbytes: int, ref_ms: float, fused_ms: float) -> None:
        gbs = nbytes / fused_ms / 1e6
        share = f" {100 * gbs / datasheet:.0f} % of {datasheet:.0f} |" if datasheet else ""
        print(f"| {name} | {nbytes / 1e6:.1f} | {ref_ms:.2f} | {fused_ms:.2f} | {ref_ms / fused_ms:.1f}x | "
              f"{gbs:.1f} |{share}")

    if args.crossover:
        crossover(cases, fused, dtype, args.repeats, device)
        return
    with torch.inference_mode():
        for name, layout, buffer in cases:
            x = torch.randn(args.tokens, layout.shape[1], dtype=dtype, device=device)
            ref = best_ms(lambda: REFERENCE.linear(x, layout, buffer), args.repeats, device)
            got = best_ms(lambda: fused.linear(x, layout, buffer), args.repeats, device)
            row(name, layout.nbytes, ref, got)
        x = torch.randn(args.tokens, 4096, dtype=dtype, device=device)
        ref = best_ms(lambda: expert_forward(expert, expert_buffer, x, REFERENCE), args.repeats, device)
        got = best_ms(lambda: expert_forward(expert, expert_buffer, x, fused), args.repeats, device)
        row("whole expert (w1, w3, SwiGLU, w2)", expert.nbytes, ref, got)


def median_ms(fn, repeats: int, clock=time.perf_counter) -> tuple[float, float]:
    """(median, best) milliseconds of `repeats` calls after a warm-up (CPU), by `clock`."""
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times) * 1e3, min(times) * 1e3


def read_bandwidth_gbs(repeats: int = 5) -> float:
    """GB/s a float32 torch.sum reads from a 512 MB tensor on torch's threads (median): the memory bound."""
    data = torch.ones(128 << 20)
    ms, _ = median_ms(lambda: data.sum(), repeats)
    return data.numel() * 4 / ms / 1e6


@torch.inference_mode()
def sweep(repeats: int, device: torch.device, cpu_time: bool = False, int_activations: str = "auto") -> None:
    """The CPU kernel's acceptance numbers: one whole 2-bit Mixtral expert (w1, w3, SwiGLU, w2) per activation
    dtype and token count, as medians, in GB/s of the expert's packed bytes (wall clock, or with `cpu_time` the
    calling thread's CPU time on one thread), with `CPUKernels(int_activations=int_activations)`."""
    from offload_engine.kernels.cpu import CPUKernels

    if device.type != "cpu":
        raise SystemExit("--sweep times the CPU kernel; run it with --device cpu")
    flags = os.environ.get("OFFLOAD_ENGINE_CXXFLAGS", "")
    print(f"CPU: {cpu_name()}; vector ISA {vector_isa(flags)}; OFFLOAD_ENGINE_CXXFLAGS={flags!r}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    bandwidth = read_bandwidth_gbs()
    print(f"memory: a float32 torch.sum reads {bandwidth:.1f} GB/s on {torch.get_num_threads()} threads (median)")
    print(f"timed by: {'the thread CPU time (1 thread)' if cpu_time else 'the wall clock'}")
    print(f"int_activations: {int_activations}\n")
    clock = time.thread_time if cpu_time else time.perf_counter
    print("| activations | tokens | multiply | median ms | best ms | GB/s of packed bytes (median) | vs float32 |")
    print("|---|---:|---|---:|---:|---:|---:|")
    float32_ms = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        kernels = CPUKernels(int_activations=int_activations)
        expert = ExpertLayout.build(4096, 14336, QuantSpec(2, 16), dtype)
        buffer = random_buffer(expert.nbytes, list(expert.matrices.values()), device)
        for tokens in (1, 2, 3, 4):
            multiply = kernels.multiplies_in(expert.matrices["w1"], tokens)
            x = torch.randn(tokens, 4096, dtype=dtype)
            ms, best = median_ms(lambda: expert_forward(expert, buffer, x, kernels), repeats, clock)
            float32_ms.setdefault(tokens, ms)
            print(f"| {str(dtype).removeprefix('torch.')} | {tokens} | {multiply} | {ms:.2f} | {best:.2f} | "
                  f"{expert.nbytes / ms / 1e6:.1f} | {float32_ms[tokens] / ms:.2f}x |", flush=True)
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return platform.processor() or platform.machine()


def vector_isa(extra_flags: str) -> str:
    """What the kernel's -march=native build uses here (less what OFFLOAD_ENGINE_CXXFLAGS turns off)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return "unknown"
    if "avx512f" in flags and "-mno-avx512f" not in extra_flags:
        return "AVX-512" + (" + AVX512-BF16" if "avx512_bf16" in flags else "")
    return "AVX2" if "avx2" in flags else "baseline"


def traffic(tokens: int, sms: int) -> None:
    """Codes loaded and launches per Mixtral-8x7B layer (2 experts, 4 attention projections), t4-16gb config."""
    from offload_engine.config import load_config
    from offload_engine.kernels.geometry import kernel_bytes, plan_launch
    from offload_engine.kernels.packing import PackedFormat

    cfg = load_config("t4-16gb")
    expert = ExpertLayout.build(4096, 14336, cfg.quant.experts, cfg.torch_dtype)
    matrices = [("w1, w3", expert.matrices["w1"], 4), ("w2", expert.matrices["w2"], 2),
                ("q_proj, o_proj", MatrixLayout.build((4096, 4096), cfg.quant.attention, cfg.torch_dtype), 2),
                ("k_proj, v_proj", MatrixLayout.build((1024, 4096), cfg.quant.attention, cfg.torch_dtype), 2)]
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"computed (kernels/geometry.py), not measured: t4-16gb, {tokens} token(s), {sms} SMs\n")
    print("| matrix | per layer | packed MB | codes MB | codes loaded MB | all loads + stores MB | kernel | launches |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    loaded = launches = 0
    for name, layout, count in matrices:
        fmt = PackedFormat.of(layout)
        counted, launch = kernel_bytes(fmt, layout.dtype.itemsize, tokens, sms), plan_launch(fmt, tokens, sms)
        codes = next(s.nbytes for s in layout.segments if s.name == "codes")
        moved = sum(counted.loads.values()) + sum(counted.stores.values())
        split = f" (K split {launch.splits})" if launch.kernel == "gemv" and launch.splits > 1 else ""
        print(f"| {name} | {count} | {layout.nbytes / 1e6:.2f} | {codes / 1e6:.2f} "
              f"| {counted.loads['codes'] / 1e6:.2f} | {moved / 1e6:.2f} | {launch.kernel}{split} "
              f"| {counted.launches} |")
        loaded, launches = loaded + count * counted.loads["codes"], launches + count * counted.launches
    print(f"\nper layer: {loaded / 1e6:.1f} MB of codes loaded, {launches} launches")


@torch.inference_mode()
def crossover(cases: list, fused, dtype: torch.dtype, repeats: int, device: torch.device) -> None:
    """The CPU kernel's two paths side by side per token count: its GEMV_MAX_TOKENS should sit where they cross."""
    from offload_engine.kernels import cpu

    if fused.name != "fused-cpu":
        raise SystemExit("--crossover times the CPU kernel's paths; run it with --device cpu")
    chosen = cpu.GEMV_MAX_TOKENS
    print(f"GEMV_MAX_TOKENS = {chosen}\n\n| kernel | tokens | GEMV ms | dequantize + BLAS ms |\n|---|---:|---:|---:|")
    try:
        for name, layout, buffer in cases:
            for tokens in (1, 8, 16, 32, 64, 128):
                x = torch.randn(tokens, layout.shape[1], dtype=dtype, device=device)
                times = []
                for limit in (1 << 30, 0):  # force each path in turn
                    cpu.GEMV_MAX_TOKENS = limit
                    times.append(best_ms(lambda: fused.linear(x, layout, buffer), repeats, device))
                print(f"| {name} | {tokens} | {times[0]:.2f} | {times[1]:.2f} |")
    finally:
        cpu.GEMV_MAX_TOKENS = chosen


if __name__ == "__main__":
    main()
