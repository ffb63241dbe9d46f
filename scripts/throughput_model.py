#!/usr/bin/env python
"""Estimate decode tokens/s of Mixtral-8x7B (4-bit attention, 2-bit experts) offloaded on a T4, 12 GB and 24 GB GPUs.

    python scripts/throughput_model.py [--markdown] [--precision 0.8] [--guesses 1] [--context 512]
        [--host-overhead-ms 0.5] [--calibrate-cpu]

The model is offload_engine/throughput.py (formula in its docstring). Inputs: hit rates replayed by the simulator on
the shared real Mixtral routing at the k that `auto` chooses (memory.plan_memory on each GPU's free memory), expert
bytes from ExpertLayout, effective PCIe and memory bandwidths (stated per GPU), and per-token compute from the bytes
the engine's kernels move (counted on meta tensors). Results: benchmarks/throughput_results.md.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from offload_engine.config import EngineConfig, load_config  # noqa: E402
from offload_engine.errors import add_debug_flag, user_errors  # noqa: E402
from offload_engine.throughput import (GPUS, NO_PREFETCH, ORACLE, GPU, Estimate, Prefetch, auto_k,  # noqa: E402
                                       cost_model, estimate, expert_traffic, simulated_hit_rate, solve,
                                       with_bandwidth)

# The reference system's measured decode speed on a Colab T4 (Mixtral-8x7B, 4-bit attention / 2-bit experts, 4
# experts per layer on the GPU): full algorithm (LRU + speculative prefetch), LRU only, naive offloading.
REFERENCE = {"full": 2.09, "lru": 1.57, "naive": 0.66}
REFERENCE_K = 4
TARGET = 2 * REFERENCE["full"]
EXPERT_BYTES = cost_model(GPUS["t4"], load_config("t4-16gb")).expert_bytes  # 2-bit g16 Mixtral expert
# GPU -> packaged configs to model: 2-bit experts everywhere, plus the 24 GB config's 3-bit experts.
SETUPS = [("t4", "t4-16gb"), ("rtx3060", "12gb"), ("rtx3090", "t4-16gb"), ("rtx3090", "24gb"),
          ("rtx4090", "t4-16gb")]


def scenarios(k: int, guess: Prefetch) -> list[tuple[str, float, bool, Prefetch]]:
    """(label, hit rate, write-back, prefetch) rows for one GPU at k experts per layer."""
    if k >= 8:
        return [("all experts resident", 1.0, True, NO_PREFETCH)]
    lru, lrfu = simulated_hit_rate(k, "lru"), simulated_hit_rate(k, "lrfu")
    return [("naive offloading (every expert copied)", 0.0, False, NO_PREFETCH),
            ("LRU, no prefetch", lru, True, NO_PREFETCH),
            (f"LRU + {guess.label}", lru, True, guess),
            ("LRU + oracle prefetch (bound)", lru, True, ORACLE),
            (f"lrfu + {guess.label}", lrfu, True, guess)]


def compute_s(args: argparse.Namespace, gpu: GPU, cfg: EngineConfig, kernel: str) -> float:
    return cost_model(gpu, cfg, kernel=kernel, context=args.context,
                      host_overhead_per_layer_s=args.host_overhead_ms / 1e3).compute_s


def run(c: float, gpu: GPU, hit: float, k: int, writeback: bool = True, prefetch: Prefetch = NO_PREFETCH,
        nbytes: int = EXPERT_BYTES, duplex: bool = False) -> Estimate:
    return estimate(c, nbytes, gpu.h2d, gpu.d2h, hit, k, writeback=writeback, prefetch=prefetch, duplex=duplex)


def reference_compute_s() -> float:
    """The per-token compute that makes this model reproduce the reference's LRU-only T4 measurement."""
    h = simulated_hit_rate(REFERENCE_K, "lru")
    return float(solve(lambda c: run(c, GPUS["t4"], h, REFERENCE_K).token_s, 1.0 / REFERENCE["lru"], 0.0, 10.0))


def table(args: argparse.Namespace, guess: Prefetch, c_ref: float) -> list[str]:
    lines = ["| GPU | experts | k | scenario | hit % | copies/token | copy stream ms | tok/s, reference kernels | "
             "tok/s, fused kernels | tok/s, reference-class compute |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for gpu_key, cfg_name in SETUPS:
        gpu, cfg = GPUS[gpu_key], load_config(cfg_name)
        k, q = auto_k(gpu, cfg), cfg.quant.experts
        nbytes = cost_model(gpu, cfg).expert_bytes
        engine_c, fused_c = compute_s(args, gpu, cfg, "engine"), compute_s(args, gpu, cfg, "fused")
        for label, h, writeback, pf in scenarios(k, guess):
            fused = run(fused_c, gpu, h, k, writeback, pf, nbytes)
            engine = run(engine_c, gpu, h, k, writeback, pf, nbytes).tokens_per_s
            ref = f"{run(c_ref, gpu, h, k, writeback, pf, nbytes).tokens_per_s:.2f}" if gpu_key == "t4" else "-"
            lines.append(f"| {gpu.name} | {q.bits}-bit g{q.group_size} | {k} | {label} | {100 * h:.1f} | "
                         f"{fused.misses + fused.wasted:.1f} | {1e3 * fused.copy_stream_s:.0f} | {engine:.2f} | "
                         f"{fused.tokens_per_s:.2f} | {ref} |")
    return lines


def requirements(args: argparse.Namespace, guess: Prefetch, c_ref: float) -> list[str]:
    """What the T4 at auto k needs for TARGET tokens/s: compute, hit rate, bandwidth (one lever at a time)."""
    t4, cfg = GPUS["t4"], load_config("t4-16gb")
    k = auto_k(t4, cfg)
    h = simulated_hit_rate(k, "lru")
    engine_c, fused_c = compute_s(args, t4, cfg, "engine"), compute_s(args, t4, cfg, "fused")

    def rate(c: float, hit: float, gpu: GPU = t4, duplex: bool = False) -> float:
        return run(c, gpu, hit, k, True, guess, duplex=duplex).tokens_per_s

    neg_c = solve(lambda x: rate(-x, h), TARGET, -10.0, 0.0)  # rate rises as compute falls
    lines = [f"Target {TARGET:.2f} tok/s (2x the reference's {REFERENCE['full']}) on the T4 at auto k={k}, LRU "
             f"({100 * h:.1f} % hit), {guess.label}:"]
    if neg_c is None:
        lines.append("- compute: unreachable even with zero compute at this hit rate and bandwidth.")
    else:
        max_c = -neg_c
        lines.append(f"- compute: at most {max_c * 1e3:.0f} ms per token, copies unchanged. With `kernels: "
                     f"reference` {engine_c * 1e3:.0f} ms ({engine_c / max_c:.1f}x too slow); reference-class compute "
                     f"{c_ref * 1e3:.0f} ms ({c_ref / max_c:.1f}x too slow); the engine's fused Triton kernels "
                     f"(their traffic, memory-bound) "
                     f"{fused_c * 1e3:.0f} ms.")
    for name, c in (("fused kernels", fused_c), ("reference-class compute", c_ref)):
        h_min = solve(lambda x: rate(c, x), TARGET, 0.0, 1.0)
        bw = solve(lambda x: rate(c, h, with_bandwidth(t4, x * 1e9)), TARGET, 0.1, 1000.0)
        lines.append(f"- with {name} ({c * 1e3:.0f} ms): now {rate(c, h):.2f} tok/s; needs hit rate >= "
                     + (f"{100 * h_min:.1f} %" if h_min is not None else "(unreachable: compute alone is too slow)")
                     + ", or host<->device bandwidth >= " + (f"{bw:.1f} GB/s" if bw is not None else "(unreachable)")
                     + "; with write-backs on a second stream (PCIe is full duplex): "
                     f"{rate(c, h, duplex=True):.2f} tok/s")
    return lines


def sanity(args: argparse.Namespace, guess: Prefetch, c_ref: float) -> list[str]:
    t4, cfg, k = GPUS["t4"], load_config("t4-16gb"), REFERENCE_K
    h = simulated_hit_rate(k, "lru")
    out = []
    for kernel in ("engine", "fused"):
        c = compute_s(args, t4, cfg, kernel)
        r = [run(c, t4, 0.0, k, False), run(c, t4, h, k), run(c, t4, h, k, True, guess),
             run(c, t4, h, k, True, ORACLE)]
        out.append(f"- {kernel} kernels (compute {c * 1e3:.0f} ms): naive {r[0].tokens_per_s:.2f}, LRU "
                   f"{r[1].tokens_per_s:.2f}, LRU + {guess.label} {r[2].tokens_per_s:.2f}, LRU + oracle "
                   f"{r[3].tokens_per_s:.2f} tok/s")
    full, oracle = run(c_ref, t4, h, k, True, guess), run(c_ref, t4, h, k, True, ORACLE)
    naive = run(c_ref, t4, 0.0, k, False)
    naive_bw = solve(lambda x: -run(c_ref, with_bandwidth(t4, x * 1e9), 0.0, k, False).token_s,
                     -1.0 / REFERENCE["naive"], 0.1, 100.0)
    out.append(f"- reference-class compute: the compute that reproduces the reference's LRU-only {REFERENCE['lru']} "
               f"tok/s is {c_ref * 1e3:.0f} ms per token; with it the model predicts LRU + {guess.label} "
               f"{full.tokens_per_s:.2f} and LRU + oracle {oracle.tokens_per_s:.2f} tok/s (reference full algorithm: "
               f"{REFERENCE['full']}), naive {naive.tokens_per_s:.2f} (reference: {REFERENCE['naive']}; matching it "
               "needs copies at " + (f"{naive_bw:.1f} GB/s" if naive_bw else "?") + ")")
    return out


def calibrate_cpu() -> list[str]:
    """Time one Mixtral-size 2-bit expert on this CPU against its counted traffic and this CPU's memcpy bandwidth."""
    from offload_engine.config import QuantSpec
    from offload_engine.experts import ExpertLayout, expert_forward

    dtype, spec = torch.bfloat16, QuantSpec(2, 16)
    layout = ExpertLayout.build(4096, 14336, spec, dtype)
    buffer = torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8)  # random codes: timing only
    x = torch.randn(1, 4096).to(dtype)
    expert_forward(layout, buffer, x)
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        expert_forward(layout, buffer, x)
        runs.append(time.perf_counter() - start)
    a = torch.empty(256 * 2**20, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    copies = []
    for _ in range(5):
        start = time.perf_counter()
        b.copy_(a)
        copies.append(time.perf_counter() - start)
    traffic = expert_traffic(4096, 14336, spec, dtype)
    memcpy = 2 * a.numel() / min(copies)
    best = min(runs)
    return [f"- CPU check ({torch.get_num_threads()} threads): one Mixtral 2-bit expert (bfloat16) takes "
            f"{best * 1e3:.0f} ms, i.e. {traffic / best / 1e9:.2f} GB/s of its {traffic / 1e9:.2f} GB counted "
            f"traffic, against {memcpy / 1e9:.1f} GB/s memcpy (read + write): {memcpy * best / traffic:.1f}x "
            "slower than memory-bound"]


@user_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", type=float, default=0.8, help="assumed precision of the engine's guesses")
    ap.add_argument("--guesses", type=int, default=1, help="experts guessed per layer (the packaged configs: 1)")
    ap.add_argument("--context", type=int, default=512, help="average KV-cache length while decoding")
    ap.add_argument("--host-overhead-ms", type=float, default=0.5, help="host time per layer per token (assumed)")
    ap.add_argument("--calibrate-cpu", action="store_true", help="also time one Mixtral-size expert on this CPU")
    ap.add_argument("--markdown", action="store_true", help="markdown bullets around the table")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    guess = Prefetch(args.guesses, args.precision)
    start = time.perf_counter()
    c_ref = reference_compute_s()
    argv_shown = sys.argv[1:] if argv is None else argv
    t4_cfg = load_config("t4-16gb")
    eng = expert_traffic(4096, 14336, t4_cfg.quant.experts, t4_cfg.torch_dtype, "engine")
    fused = expert_traffic(4096, 14336, t4_cfg.quant.experts, t4_cfg.torch_dtype, "fused")
    nbytes = EXPERT_BYTES
    header = [
        f"$ python scripts/throughput_model.py {' '.join(shlex.quote(a) for a in argv_shown)}".rstrip(),
        f"machine: {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__} "
        "(the model needs no GPU)",
        f"expert: {nbytes / 1e6:.1f} MB packed (2-bit g16, 8-bit scales/zeros); the reference kernels move "
        f"{eng / 1e9:.2f} GB per expert per token (dequantize to a full fp16 matrix, then matmul), the fused Triton "
        f"kernels {fused / 1e6:.1f} MB (packed bytes, activations, split-K partial sums)",
        f"assumptions: {args.guesses} guess(es)/layer at precision {args.precision}; KV context {args.context}; "
        f"host overhead {args.host_overhead_ms} ms/layer; hit rates: simulator on the shared real Mixtral routing, "
        "engine semantics",
    ] + [f"{g.name}: {g.link}, {g.free_bytes / 2**30:.1f} GiB free; {g.why}" for g in GPUS.values()]
    body = table(args, Prefetch(args.guesses, args.precision), c_ref)
    tail = ["", "Sanity check, reference settings (T4, k=4, LRU):"] + sanity(args, guess, c_ref)
    tail += ["", *requirements(args, guess, c_ref)]
    if args.calibrate_cpu:
        tail += ["", *calibrate_cpu()]
    if args.markdown:
        header = [f"`{header[0][2:]}`", ""] + [f"- {line}" for line in header[1:]]
    print("\n".join(header + [""] + body + tail))
    print(f"\n(modelled in {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
