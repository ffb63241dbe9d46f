"""Memory plan for Mixtral-8x7B under each packaged config: what `experts_on_device: auto` picks, the device memory
it takes, the host RAM it needs (experts page-locked at their exact size + the process), and whether evicted experts
are written back (`offload.write_back: auto`: not when host RAM holds every expert).

    python scripts/plan_memory.py [--free-gib 14.5] [--host-gib 11.8] [--config t4-16gb]

`--free-gib` is what `torch.cuda.mem_get_info()` reports free before loading (a Colab T4: ~14.5 GiB of 15).
Without it, each GPU config is planned against a typical free amount for its GPU size. `--host-gib` checks the
host side against that much available RAM; without it, each config is planned for the machines it is meant for:
t4-16gb on Colab (12.7 GB) and on Kaggle's T4 VMs (29 GB), the others on a 16 GB and a 32 GB desktop.
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
HOSTS_GB = {"t4-16gb": (12.7, 29.0), "12gb": (16.0, 32.0), "8gb": (16.0, 32.0), "24gb": (32.0,)}  # decimal GB


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
    g = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    print("| config | free VRAM | host RAM | experts/layer | expert | trunk | KV cache | prefill | spare slots | margin "
          "| total VRAM | write-backs | host RAM: pinned experts + process |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        free = (args.free_gib or TYPICAL_FREE_GIB.get(name, 14.5)) * GiB
        config = load_config(name)
        bits = f"{config.quant.attention.bits}/{config.quant.experts.bits}"
        hosts = [args.host_gib * GiB] if args.host_gib else [gb * 1e9 for gb in HOSTS_GB.get(name, (None,))]
        for host in hosts:
            ram = "not checked" if host is None else f"{host / 1e9:.1f} GB"
            try:
                plan = plan_memory(MIXTRAL_8X7B, config, int(free), host_free_bytes=None if host is None else int(host))
            except NotEnoughMemory as e:
                print(f"| {name} | {free / GiB:.1f} GiB | {ram} | does not fit: {e} |")
                continue
            if plan.experts_on_device >= MIXTRAL_8X7B.num_local_experts:
                write_backs = "none (all resident)"
            else:
                write_backs = "yes (swap)" if plan.write_back else "no (every expert in host RAM)"
            pinned = f"{plan.host_pinned_bytes / GiB:.2f}" if plan.host_pinned_bytes else "0"
            if plan.host_static_bytes:  # static placement: those layers' experts, pageable
                pinned += f" + {plan.host_static_bytes / GiB:.2f} (layers on the CPU)"
            per_layer = str(plan.experts_on_device) + (f" (the first {plan.cpu_layers} layers' experts on the CPU)"
                                                       if plan.cpu_layers else "")
            print(f"| {name} ({bits} bits, {plan.context} ctx) | {free / GiB:.1f} GiB | {ram} | "
                  f"{per_layer} | {plan.expert_bytes / 2**20:.1f} MiB | {g(plan.trunk_bytes)} | "
                  f"{g(plan.kv_cache_bytes)} | {g(plan.prefill_bytes)} | {g(plan.spare_bytes)} | {g(plan.margin_bytes)} | {g(plan.total_bytes)} | "
                  f"{write_backs} | {pinned} + {plan.host_margin_bytes / GiB:.2f} = {g(plan.host_total_bytes)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
