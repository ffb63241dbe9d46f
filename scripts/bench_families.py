"""Decode speed on a Qwen3-MoE-shaped model (many small experts) vs transformers, and what one expert lookup and
one expert copy cost in the cache.

    python scripts/bench_families.py [--hidden 512 --moe-intermediate 192 --experts 128 --top-k 8 --layers 4]
                                     [--new-tokens 32] [--repeats 3] [--threads N] [--offloaded 32]

Builds a random Qwen3-MoE checkpoint (transformers' own class, save_pretrained) in a temporary directory, then
times greedy generation (batch 1, float32) with transformers (eager experts, and its default experts
implementation) and with the engine: unquantized and 4/2-bit (fused kernels), all experts resident and with
`--offloaded` experts per layer on the "device" (+ prefetch top-k). On CPU the device is host memory, so an
offloaded expert costs a memcpy of its bytes plus the cache's bookkeeping: the two are timed apart at the end
(the cache protocol alone, on buffers of this model's expert size). Prints the command, the machine and tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402

import offload_engine  # noqa: E402
from offload_engine.expert_cache import ExpertCache  # noqa: E402
from bench_generate import set_up, timed  # noqa: E402


def cache_protocol_us(nbytes: int, experts: int, top_k: int, resident: int, rounds: int = 200) -> tuple[float, float]:
    """(microseconds per lookup, misses per lookup) of a layer call's protocol (begin_layer, acquire, use, computed,
    end_layer) with `resident` (> top_k) experts per layer and random top-k routing: hits only when all are
    resident, else copies too."""
    cache = ExpertCache(1, experts, nbytes, resident, 0, torch.device("cpu"))
    for e in range(experts):
        cache.fill(0, e, lambda buffer: buffer.zero_())
    gen = torch.Generator().manual_seed(0)
    calls = [torch.randperm(experts, generator=gen)[:top_k].tolist() for _ in range(rounds)]
    start = time.perf_counter()
    for order in calls:
        cache.begin_layer(0, order)
        for i, expert in enumerate(order):
            cache.acquire(0, expert, protect=order[i + 1:])
        for expert in order:
            cache.use(0, expert)
            cache.computed(0, expert)
        cache.end_layer(0)
    seconds = time.perf_counter() - start
    stats = cache.stats[0]
    return 1e6 * seconds / stats.lookups, stats.misses / stats.lookups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--moe-intermediate", type=int, default=192)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--offloaded", type=int, default=32, help="experts per layer on the device when offloading")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    set_up(args)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                            moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=args.experts,
                            num_experts_per_tok=args.top_k, norm_topk_prob=True, eos_token_id=None)
    n, E, K = args.new_tokens, args.experts, args.top_k
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as quantized_tmp:
        Qwen3MoeForCausalLM(config).save_pretrained(tmp)
        prompt = torch.randint(0, args.vocab, (1, args.prompt_len))
        print(f"model: Qwen3-MoE, hidden {args.hidden}, {args.layers} layers, {E} experts of intermediate "
              f"{args.moe_intermediate}, top-{K}, vocab {args.vocab}; dtype float32; batch 1; prompt "
              f"{args.prompt_len} tokens; {n} new tokens, greedy; best of {args.repeats}")
        rows = []
        for implementation in ("eager", None):
            kwargs = {"experts_implementation": implementation} if implementation else {}
            reference = Qwen3MoeForCausalLM.from_pretrained(tmp, dtype=torch.float32, **kwargs).eval()
            seconds, hf_tokens = timed(lambda: reference.generate(prompt, max_new_tokens=n, min_new_tokens=n,
                                                                  do_sample=False)[0, args.prompt_len:].tolist(),
                                       args.repeats)
            name = implementation or f"default: {reference.config._experts_implementation}"
            rows.append((f"transformers Qwen3MoeForCausalLM ({name} experts)", "-", E, seconds, "yes", None))
        none = {"bits": None}
        q42 = {"attention": {"bits": 4, "group_size": 64}, "experts": {"bits": 2, "group_size": 16}}
        runs = [("unquantized", {"attention": none, "experts": none}, "reference"), ("4/2 bits, fused", q42, "fused")]
        # Quantize once (HQQ's optimiser on 2 cores takes a while), then load the pre-quantized copy per run.
        quantized = offload_engine.quantize_checkpoint(tmp, Path(quantized_tmp) / "q42",
                                                       {"dtype": "float32", "quant": q42}, progress=False)
        for label, quant, kernels in runs:
            for k, prefetch in ((E, 0), (args.offloaded, 0), (args.offloaded, K)):
                offload = {"kernels": kernels, "offload": {"experts_on_device": k, "prefetch": prefetch}}
                source, config = (quantized, offload) if quant is q42 else (tmp, {**offload, "dtype": "float32",
                                                                                   "quant": quant})
                engine = offload_engine.load(source, config=config, progress=False)
                seconds, tokens = timed(lambda: engine.generate_ids(prompt[0].tolist(), max_new_tokens=n),
                                        args.repeats)
                engine.reset_stats()
                engine.generate_ids(prompt[0].tolist(), max_new_tokens=n)
                stats = engine.stats()["overall"]
                same = ("yes" if tokens == hf_tokens else "no") if quant is not q42 else "n/a (quantized)"
                where = "all resident" if k == E else f"{k}/layer + prefetch {prefetch}"
                rows.append((f"offload_engine, {label}, {where}", f"{engine.cache.nbytes / 1024:.0f} KiB", k, seconds,
                             same, stats))
                expert_bytes = engine.cache.nbytes
                engine.close()

    base = rows[2][3]
    print("\n| implementation | bytes/expert | tokens/s | vs unquantized engine | misses/token | same tokens as "
          "transformers |")
    print("|---|---|---:|---:|---:|---|")
    for name, size, k, seconds, same, stats in rows:
        misses = f"{stats['misses'] / n:.1f}" if stats else "-"
        print(f"| {name} | {size} | {n / seconds:.1f} | {base / seconds:.2f}x | {misses} | {same} |")

    print(f"\ncache protocol alone, {expert_bytes / 1024:.0f} KiB experts (the last engine's), {E} per layer, top-{K}:")
    print("| experts resident | misses per lookup | us per lookup |")
    print("|---:|---:|---:|")
    for resident in (E, args.offloaded):
        us, miss_rate = cache_protocol_us(expert_bytes, E, K, resident)
        print(f"| {resident} | {miss_rate:.2f} | {us:.1f} |")


if __name__ == "__main__":
    main()
