"""Memory plan for Mixtral-8x7B under each packaged config: what `experts_on_device: auto` picks, the device memory
it takes, and the host RAM it needs (the offloaded experts page-locked at their exact size + the process).

    python scripts/plan_memory.py [--free-gib 14.5] [--host-gib 11.8] [--config t4-16gb]

`--free-gib` is what `torch.cuda.mem_get_info()` reports free before loading (a Colab T4: ~14.5 GiB of 15).
Without it, each GPU config is planned against a typical free amount for its GPU size. `--host-gib` checks the
host side against that much available RAM (Colab: 12.7 GB = 11.8 GiB in all); without it, the t4-16gb config is
checked against Colab's RAM and the others are not checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import MixtralConfig  # noqa: E402

from offload_engine.config import load_config  # noqa: E402
from offload_engine.errors import add_debug_flag, user_errors  # noqa: E402
from offload_engine.memory import GiB, NotEnoughMemory, plan_memory  # noqa: E402

MIXTRAL_8X7B = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                             num_experts_per_tok=2, max_position_embeddings=32768)
TYPICAL_FREE_GIB = {"t4-16gb": 14.5, "12gb": 11.3, "8gb": 7.4, "24gb": 23.2}
COLAB_RAM_GIB = 12.7e9 / GiB


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--free-gib", type=float)
    parser.add_argument("--host-gib", type=float, help="available host RAM to check the plan against")
    parser.add_argument("--config", action="append", help="config name or YAML path (repeatable)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    print("command:", " ".join(["python", *sys.argv]))
    names = args.config or list(TYPICAL_FREE_GIB)
    print("| config | free VRAM | experts/layer | expert | trunk | KV cache | prefill | spare slots | margin "
          "| total VRAM | host: pinned experts | host: process | host total (checked against) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        free = (args.free_gib or TYPICAL_FREE_GIB.get(name, 14.5)) * GiB
        config = load_config(name)
        host = args.host_gib or (COLAB_RAM_GIB if name == "t4-16gb" else None)
        try:
            plan = plan_memory(MIXTRAL_8X7B, config, int(free), host_free_bytes=int(host * GiB) if host else None)
        except NotEnoughMemory as e:
            print(f"| {name} | {free / GiB:.1f} GiB | does not fit: {e} |")
            continue
        g = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
        bits = f"{config.quant.attention.bits}/{config.quant.experts.bits}"
        print(f"| {name} ({bits} bits, {plan.context} ctx) | {free / GiB:.1f} GiB | {plan.experts_on_device} | "
              f"{plan.expert_bytes / 2**20:.1f} MiB | {g(plan.trunk_bytes)} | {g(plan.kv_cache_bytes)} | "
              f"{g(plan.prefill_bytes)} | {g(plan.spare_bytes)} | {g(plan.margin_bytes)} | {g(plan.total_bytes)} | {g(plan.host_pinned_bytes)} | "
              f"{g(plan.host_margin_bytes)} | {g(plan.host_total_bytes)} ({f'{host:.1f} GiB' if host else 'not checked'}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
