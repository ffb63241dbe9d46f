"""GPU check (issue 15): exactness, copy/compute overlap including write-backs, and every host sync, asserted.

    python scripts/gpu_check.py [--hidden 2048 --intermediate 7168 --layers 8] [--new-tokens 48] [--trace out.json]

Needs a CUDA GPU; sized for a 16 GB T4 with Colab's 12.7 GB of RAM. Three checks, each asserting (exit status 1
and the failed check named, otherwise "all checks passed"):
1. exactness: an unquantized fp32 engine (2 experts/layer on the GPU, prefetch 2) against transformers' Mixtral on
   the same weights, the reference computed in pieces (accelerate's cpu_offload: one module's weights on the GPU
   at a time), on a smaller model (--exact-*) so that both fit; TF32 off. Logits within 1e-3, greedy tokens equal.
2. overlap: fp16, 4-bit attention / 2-bit experts, 2 experts/layer, prefetch 0, 1, 2: tokens/s, hit rate,
   prefetch precision/recall, and from a torch.profiler trace the pinned copies in both directions (host->device
   copy-ins, device->host write-backs): their streams (never the compute stream's), and the fraction of their time
   that ran while a kernel ran on another stream. With prefetch, some copy time must overlap compute.
3. syncs: decode steps under torch.cuda.set_sync_debug_mode("warn"); every synchronizing call is listed with the
   engine line that made it. Per token at most one routing read per layer, the layer-0 guess and the sampler's
   read; never more than the engine's own `host_syncs` counter plus the sampler's read.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

import offload_engine  # noqa: E402

QUANT = {"attention": {"bits": 4, "group_size": 64}, "experts": {"bits": 2, "group_size": 16}}
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("  ok: " if ok else "  FAILED: ") + what)
    if not ok:
        failures.append(what)


def write_model(path: str, hidden: int, intermediate: int, layers: int, dtype: torch.dtype) -> MixtralConfig:
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                           num_local_experts=8, num_experts_per_tok=2, eos_token_id=None)
    MixtralForCausalLM(config).to(dtype).save_pretrained(path)
    return config


def exactness(args) -> None:
    from accelerate import cpu_offload

    print(f"\n1. exactness: fp32 unquantized, hidden {args.exact_hidden}, intermediate {args.exact_intermediate}, "
          f"{args.exact_layers} layers, 2 experts/layer on the GPU, prefetch 2; reference in pieces (cpu_offload)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        write_model(tmp, args.exact_hidden, args.exact_intermediate, args.exact_layers, torch.float32)
        exact = {"dtype": "float32", "quant": {"attention": {"bits": None}, "experts": {"bits": None}},
                 "offload": {"experts_on_device": 2, "prefetch": 2}}
        engine = offload_engine.load(tmp, config=exact, device="cuda", progress=False)
        reference = MixtralForCausalLM.from_pretrained(tmp, dtype=torch.float32, experts_implementation="eager").eval()
        cpu_offload(reference, execution_device=torch.device("cuda"))
        ids = torch.randint(0, 32000, (1, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref_logits = reference(ids.cuda()).logits.float().cpu()
            expected = reference.generate(ids[:, :8].cuda(), max_new_tokens=16, do_sample=False)[0, 8:].tolist()
        diff = (engine.logits(ids) - ref_logits).abs().max().item()
        check(diff < 1e-3, f"max |engine - transformers| logits = {diff:.2e} (< 1e-3)")
        got = engine.generate_ids(ids[0, :8].tolist(), max_new_tokens=16)
        check(got == expected, f"greedy tokens equal ({sum(a == b for a, b in zip(got, expected))}/16 agree)")
        engine.cache.check_invariant()
        engine.close()
        del engine, reference
        torch.cuda.empty_cache()


def copy_overlap(prof, compute_stream: int) -> dict:
    """Pinned copies by direction: seconds, streams, and the fraction overlapping a kernel on another stream."""
    copies: dict[str, list] = {"HtoD": [], "DtoH": []}
    kernels = []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        span = (e.time_range.start, e.time_range.end, getattr(e, "device_resource_id", None))
        if "Memcpy" in e.name:
            if "Pageable" not in e.name:  # the expert copies (page-locked); routing reads go to pageable memory
                copies["HtoD" if "HtoD" in e.name else "DtoH"].append(span)
        else:
            kernels.append(span)
    out = {}
    for direction, spans in copies.items():
        total = sum(end - start for start, end, _ in spans)
        overlapped = sum(max(0.0, min(end, k_end) - max(start, k_start))
                         for start, end, stream in spans for k_start, k_end, k_stream in kernels if k_stream != stream)
        out[direction] = {"s": total / 1e6, "overlap": overlapped / total if total else 0.0,
                          "streams": {stream for _, _, stream in spans}, "n": len(spans)}
    out["compute_stream"] = compute_stream
    return out


def overlap(args, tmp: str) -> None:
    print(f"\n2. overlap: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers; fp16, 4-bit "
          f"attention, 2-bit experts, 2 experts/layer; batch 1, prompt 16, {args.new_tokens} new tokens greedy")
    print("| prefetch | tokens/s | hit rate | precision | recall | HtoD copies (s) | overlapped | DtoH write-backs (s) "
          "| overlapped |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for prefetch in (0, 1, 2):
        engine = offload_engine.load(tmp, config={"dtype": "float16", "quant": QUANT, "offload": {
            "experts_on_device": 2, "prefetch": prefetch}}, device="cuda", progress=False)
        prompt = torch.randint(0, 32000, (16,), generator=torch.Generator().manual_seed(1)).tolist()
        engine.generate_ids(prompt, max_new_tokens=4)  # warm-up
        engine.reset_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.generate_ids(prompt, max_new_tokens=args.new_tokens)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        o = engine.stats()["overall"]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.generate_ids(prompt, max_new_tokens=8)
            torch.cuda.synchronize()
        if args.trace and prefetch == 1:
            prof.export_chrome_trace(args.trace)
        c = copy_overlap(prof, torch.cuda.current_stream().stream_id)
        rows.append((prefetch, c))
        print(f"| {prefetch} | {args.new_tokens / seconds:.2f} | {o['hit_rate']:.1%} | {o['prefetch_precision']:.1%} | "
              f"{o['prefetch_recall']:.1%} | {c['HtoD']['s']:.3f} | {c['HtoD']['overlap']:.0%} | {c['DtoH']['s']:.3f} | "
              f"{c['DtoH']['overlap']:.0%} |")
        engine.close()
        del engine
        torch.cuda.empty_cache()
    for prefetch, c in rows:
        check(c["HtoD"]["n"] > 0 and c["DtoH"]["n"] > 0, f"prefetch {prefetch}: copy-ins and write-backs both ran")
        check(not (c["HtoD"]["streams"] & c["DtoH"]["streams"]),
              f"prefetch {prefetch}: write-backs on their own stream {c['DtoH']['streams']} (copy-ins on "
              f"{c['HtoD']['streams']})")
        if prefetch:
            check(c["HtoD"]["overlap"] > 0 and c["DtoH"]["overlap"] > 0,
                  f"prefetch {prefetch}: copies in both directions overlap compute")


def syncs(args, tmp: str) -> None:
    print("\n3. host syncs during decode (torch.cuda.set_sync_debug_mode('warn'))")
    engine = offload_engine.load(tmp, config={"dtype": "float16", "quant": QUANT, "offload": {
        "experts_on_device": 2, "prefetch": 1}}, device="cuda", progress=False)
    steps, where = 8, Counter()
    prompt = torch.randint(0, 32000, (16,), generator=torch.Generator().manual_seed(2)).tolist()
    engine.generate_ids(prompt, max_new_tokens=2)  # warm-up
    engine.reset_stats()
    root = str(Path(offload_engine.__file__).resolve().parent)

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack() if f.filename.startswith(root)]
        where[f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line}" if frames else filename] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():  # restores showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.generate_ids(prompt, max_new_tokens=steps + 1)  # prefill + `steps` decode forwards + samples
        finally:
            torch.cuda.set_sync_debug_mode("default")
    total = sum(where.values())
    for place, n in where.most_common():
        print(f"  {n:4d}  {place}")
    reported = engine.stats()["host_syncs"]
    layers = args.layers
    print(f"  {total} syncs in a prefill + {steps} decode steps; engine reports {reported} routing reads "
          f"(+{steps + 1} sampler reads)")
    check(total <= reported + steps + 1, "no sync beyond the engine's counted routing reads and the sampler's")
    check(reported == (steps + 1) * (layers + 1), f"one routing read per layer per token, plus the layer-0 guess "
                                                  f"({reported} = {steps + 1} x {layers + 1})")
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=7168)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--exact-hidden", type=int, default=1024)
    parser.add_argument("--exact-intermediate", type=int, default=3584)
    parser.add_argument("--exact-layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--trace", help="write a Chrome trace of the prefetch=1 run here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: this check needs a CUDA GPU (torch.cuda.is_available() is False)")
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print("machine:", platform.node(), torch.cuda.get_device_name(), f"torch {torch.__version__}")
    exactness(args)
    with tempfile.TemporaryDirectory() as tmp:
        write_model(tmp, args.hidden, args.intermediate, args.layers, torch.bfloat16)
        overlap(args, tmp)
        syncs(args, tmp)
    if failures:
        sys.exit(f"\n{len(failures)} check(s) failed: " + "; ".join(failures))
    print("\nall checks passed")


if __name__ == "__main__":
    main()
