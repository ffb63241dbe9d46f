"""GPU check: copies run on the side stream and overlap compute; prefetch cuts the time compute waits (issue 3).

    python scripts/gpu_check.py [--hidden 2048 --intermediate 7168 --layers 8] [--new-tokens 48] [--trace out.json]

Needs a CUDA GPU. Builds a random Mixtral-architecture checkpoint, loads it at 4-bit attention / 2-bit
experts with 2 experts per layer on the GPU, and for prefetch 0, 1, 2 reports: tokens/s, hit rate, prefetch
precision/recall, time compute waited for copies, host syncs per token, and, from a torch.profiler trace,
how much of the host->device copy time ran concurrently with kernels on another stream (overlap). Also checks
that the engine's logits equal transformers' on the same weights with no quantization (fp32, k=2, prefetch 2).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

import offload_engine  # noqa: E402


def overlap_fraction(prof) -> tuple[float, float]:
    """(seconds of HtoD copies, fraction of them that ran while a kernel ran on another stream)."""
    copies, kernels = [], []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        span = (e.time_range.start, e.time_range.end, getattr(e, "device_resource_id", None))
        (copies if "Memcpy HtoD" in e.name else kernels).append(span)
    total = sum(end - start for start, end, _ in copies)
    overlapped = 0.0
    for start, end, stream in copies:
        for k_start, k_end, k_stream in kernels:
            if k_stream != stream:
                overlapped += max(0.0, min(end, k_end) - max(start, k_start))
    return total / 1e6, (overlapped / total if total else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=7168)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--trace", help="write a Chrome trace of the prefetch=1 run here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: this check needs a CUDA GPU (torch.cuda.is_available() is False)")
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print("machine:", platform.node(), torch.cuda.get_device_name(), f"torch {torch.__version__}")

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                           num_local_experts=8, num_experts_per_tok=2, eos_token_id=None)
    with tempfile.TemporaryDirectory() as tmp:
        MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)

        exact = {"dtype": "float32", "quant": {"attention": {"bits": None}, "experts": {"bits": None}},
                 "offload": {"experts_on_device": 2, "prefetch": 2}}
        engine = offload_engine.load(tmp, config=exact, device="cuda", progress=False)
        reference = MixtralForCausalLM.from_pretrained(tmp, dtype=torch.float32, experts_implementation="eager").cuda()
        ids = torch.randint(0, 32000, (1, 24))
        diff = (engine.logits(ids) - reference(ids.cuda()).logits.cpu()).abs().max().item()
        print(f"exactness (fp32, k=2, prefetch 2) max |engine - transformers| = {diff:.2e}")
        del engine, reference
        torch.cuda.empty_cache()

        print(f"\nmodel: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers; fp16, 4-bit attn, "
              f"2-bit experts, 2 experts/layer; batch 1, prompt 16, {args.new_tokens} new tokens greedy")
        print("| prefetch | tokens/s | hit rate | precision | recall | wait for copies (s) | syncs/token | "
              "HtoD copy time (s) | copies overlapped |")
        print("|---|---|---|---|---|---|---|---|---|")
        quant = {"attention": {"bits": 4, "group_size": 64}, "experts": {"bits": 2, "group_size": 16}}
        for prefetch in (0, 1, 2):
            engine = offload_engine.load(tmp, config={"dtype": "float16", "quant": quant, "offload": {
                "experts_on_device": 2, "prefetch": prefetch}}, device="cuda", progress=False)
            prompt = torch.randint(0, 32000, (16,)).tolist()
            engine.generate_ids(prompt, max_new_tokens=4)  # warm-up
            engine.reset_stats()
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.generate_ids(prompt, max_new_tokens=args.new_tokens)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            stats = engine.stats()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                engine.generate_ids(prompt, max_new_tokens=8)
                torch.cuda.synchronize()
            copy_s, overlapped = overlap_fraction(prof)
            if args.trace and prefetch == 1:
                prof.export_chrome_trace(args.trace)
            o = stats["overall"]
            print(f"| {prefetch} | {args.new_tokens / seconds:.2f} | {o['hit_rate']:.1%} | {o['prefetch_precision']:.1%} | "
                  f"{o['prefetch_recall']:.1%} | {o['wait_s']:.3f} | {stats['host_syncs'] / (args.new_tokens + 1):.1f} | "
                  f"{copy_s:.3f} | {overlapped:.0%} |")
            del engine
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
