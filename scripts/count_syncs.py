"""Host syncs per decode token on Mixtral's routing shapes (32 layers, top-2 of 8 experts), counted on CPU.

    PYTHONPATH=. python scripts/count_syncs.py [--steps 16] [--experts-on-device 4]

A GPU blocks the host on every device->host read: scalar reads, data-dependent shapes, .tolist(). This runs the
real engine on a small model with Mixtral's layer count and routing (hidden size 64: the count does not depend
on it) and counts those reads per decode forward (stream_check.SyncCounter), next to what the engine reports
(`stats()["host_syncs"]`) and the host-blocking waits of the cache (none unless profiling). The sampler adds one
read per token (the sampled id) outside the forward. scripts/gpu_check.py lists the real syncs on a GPU.

Then the torch ops per MoE layer per decode token (stream_check.OpCounter: ops that do work, views excluded; on
CUDA each is a launch or host-side op), split by where they are issued: the guess for the next layer
(`_speculate`), the routing read (`_experts`), the expert loop (`_run_experts`: gathering tokens, weighting and
summing outputs, the cache's calls), the experts' own matmuls (`expert_forward`, unquantized here), and the rest
(attention, norms, the router, embedding and lm_head shared out per layer).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import DynamicCache, MixtralConfig, MixtralForCausalLM  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

import offload_engine  # noqa: E402
from offload_engine.stream_check import OpCounter, SyncCounter  # noqa: E402

PARTS = {"guess": {"_speculate"}, "routing read": {"_experts"}, "expert loop": {"_run_experts"},
         "expert matmuls": {"expert_forward"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--experts-on-device", type=int, default=4)
    args = parser.parse_args()
    print("command:", " ".join(["python", *sys.argv]))
    print("machine:", platform.node(), platform.processor() or platform.machine(), f"torch {torch.__version__}, cpu")
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=1000, hidden_size=64, intermediate_size=64, num_hidden_layers=32,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                           eos_token_id=None)
    print(f"model: 32 layers, top-2 of 8 experts, hidden 64, fp32; batch 1, prompt 8, {args.steps} decode steps, "
          f"{args.experts_on_device} experts/layer on the device")
    rows = []
    transformers_logging.disable_progress_bar()  # nothing but the table's rows may appear between its lines
    with tempfile.TemporaryDirectory() as tmp:
        MixtralForCausalLM(config).save_pretrained(tmp)
        print("| prefetch | syncs per decode token (counted) | engine reports | cache host waits |")
        print("|---|---|---|---|", flush=True)
        for prefetch in (0, 1, 2):
            engine = offload_engine.load(tmp, progress=False, device="cpu", config={
                "dtype": "float32", "quant": {"attention": {"bits": None}, "experts": {"bits": None}},
                "offload": {"experts_on_device": args.experts_on_device, "prefetch": prefetch}})
            kv_cache = DynamicCache(config=engine.model.config)
            engine.model(torch.arange(8)[None], kv_cache)
            engine.reset_stats()
            with SyncCounter() as counter:
                for step in range(args.steps):
                    engine.model(torch.tensor([[step + 10]]), kv_cache)
            stats = engine.stats()
            print(f"| {prefetch} | {counter.count / args.steps:.1f} | {stats['host_syncs'] / args.steps:.1f} | "
                  f"{engine.cache.host_waits} |", flush=True)
            ops = OpCounter(PARTS)
            with ops:
                for step in range(args.steps):
                    engine.model(torch.tensor([[step + 100]]), kv_cache)
            per_layer = lambda n: n / args.steps / 32  # noqa: E731
            rows.append(f"| {prefetch} | {per_layer(ops.total):.1f} | " + " | ".join(
                f"{per_layer(ops.by_part.get(part, 0)):.1f}" for part in [*PARTS, "other"]) + " |")
    print()
    print("| prefetch | torch ops per MoE layer per decode token | guess | routing read | expert loop | "
          "expert matmuls | attention, norms, router, rest |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
