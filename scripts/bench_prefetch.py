"""Hit rate and prefetch precision/recall of the engine on a small CPU model, k = 1..8, prefetch 0/1/2 (issue 3).

    python scripts/bench_prefetch.py [MODEL] [--new-tokens 48] [--prompts 4]

MODEL defaults to the packaged demo model (offload_engine/demo). Each (k, prefetch) pair loads the engine
(float32, unquantized: routing is what matters here), prefills each prompt, resets the counters and decodes
greedily, so the numbers are decode-only. It also compares the engine's replacement rule for prefetched
experts (staged in a spare slot; takes the LRU's place only when used) with the alternative (a prefetched
expert enters the cache at once, evicting the LRU), by replaying the recorded routing and guesses.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import offload_engine  # noqa: E402
from offload_engine.errors import add_debug_flag, user_errors  # noqa: E402
from offload_engine.policy import make_policy  # noqa: E402

PROMPTS = ["The history of the city begins", "Here is a recipe for a simple bread:",
           "In this article we explain how to", "The best way to learn a new language is"]


def decode(engine, prompt_ids: list[int], new_tokens: int, record: list) -> None:
    """Prefill, reset counters, then greedy decode. `record` gets one step per forward: a list of
    (layer, experts in lookup order, guess for the layer, counted); the prefill step is replayed, not counted."""

    def observe(step: list, counted: bool):
        def on_routing(layer, experts, guess):
            order = list(dict.fromkeys(e for token in experts for e in token))  # the MoE layer's lookup order
            step.append((layer, order, guess, counted))
        return on_routing

    kv_cache = DynamicCache(config=engine.model.config)
    step: list = []
    logits = engine.model(torch.tensor([prompt_ids]), kv_cache, on_routing=observe(step, False))[0, -1]
    record.append(step)
    engine.reset_stats()
    for _ in range(new_tokens):
        token = int(logits.argmax())
        step = []
        logits = engine.model(torch.tensor([[token]]), kv_cache, on_routing=observe(step, True))[0, -1]
        record.append(step)


def replay(record: list, k: int, num_experts: int, staged_rule: bool) -> tuple[int, int]:
    """(hits, lookups) of an LRU cache of k per layer, warm with experts 0..k-1, under either prefetch rule."""
    num_layers = len(record[0])  # record: per token, per layer (layer, routed experts, guess for that layer)
    main = [set(range(k)) for _ in range(num_layers)]
    policies = [make_policy("lru", num_experts) for _ in range(num_layers)]
    for p in policies:
        for e in range(k):
            p.touch(e)
    staged = [set() for _ in range(num_layers)]
    hits = lookups = 0

    def admit(layer: int, expert: int, protect) -> None:
        candidates = [e for e in main[layer] if e not in protect]
        if candidates:
            victim = policies[layer].victim(candidates)
            main[layer].discard(victim)
            policies[layer].evicted(victim)
            main[layer].add(expert)

    for step in record:
        for layer, experts, guess, counted in step:  # guess: what was speculated for this layer before it ran
            for expert in guess:
                if expert in main[layer]:
                    continue
                if staged_rule:
                    staged[layer].add(expert)
                else:  # the alternative: it enters the cache at once, evicting the LRU expert
                    admit(layer, expert, ())
                    policies[layer].touch(expert)
            for i, expert in enumerate(experts):
                lookups += counted
                if expert in main[layer] or expert in staged[layer]:
                    hits += counted
                if expert not in main[layer]:
                    admit(layer, expert, experts[i + 1 :])
                policies[layer].touch(expert)
            staged[layer].clear()
    return hits, lookups


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(Path(offload_engine.__file__).parent / "demo"))
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=4)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print("machine:", f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU")
    config = {"dtype": "float32", "quant": {"attention": {"bits": None}, "experts": {"bits": None}}}
    rows, rule_rows = [], []
    for k in range(1, 9):
        for prefetch in (0, 1, 2):
            engine = offload_engine.load(args.model, config={**config, "offload": {
                "experts_on_device": k, "prefetch": prefetch}}, progress=False)
            prompts = [engine.encode(p) for p in PROMPTS[: args.prompts]]
            total, record = None, []
            for ids in prompts:
                decode(engine, ids, args.new_tokens, record)
                stats = engine.stats()["overall"]
                total = stats if total is None else {key: total[key] + stats[key] for key in
                                                     ("lookups", "hits", "guessed", "guessed_correct",
                                                      "needed_after_guess", "prefetch_issued", "prefetch_used")}
            hit_rate = total["hits"] / total["lookups"]
            precision = total["guessed_correct"] / total["guessed"] if total["guessed"] else float("nan")
            recall = total["guessed_correct"] / total["needed_after_guess"] if total["needed_after_guess"] else float("nan")
            rows.append((k, prefetch, hit_rate, precision, recall, total["prefetch_issued"], total["prefetch_used"]))
            if prefetch and k < 8:
                staged = replay(record, k, 8, staged_rule=True)
                alternative = replay(record, k, 8, staged_rule=False)
                # The replay of the engine's own rule must reproduce the engine's counters.
                assert staged == (total["hits"], total["lookups"]), (staged, total["hits"], total["lookups"])
                rule_rows.append((k, prefetch, staged[0] / staged[1], alternative[0] / alternative[1]))
    tokens = args.prompts * args.new_tokens
    print(f"\nmodel {args.model}; float32 unquantized; batch 1; {args.prompts} prompts x {args.new_tokens} decode "
          f"tokens ({tokens} tokens); counters are decode-only")
    print("| experts/layer | prefetch | hit rate | precision | recall | prefetches issued | used |")
    print("|---|---|---|---|---|---|---|")
    for k, p, hit, prec, rec, issued, used in rows:
        fmt = lambda x: "-" if x != x else f"{x:.1%}"  # noqa: E731
        print(f"| {k} | {p} | {hit:.1%} | {fmt(prec)} | {fmt(rec)} | {issued} | {used} |")
    print("\nreplacement rule for prefetched experts (hit rate, same routing and guesses):")
    print("| experts/layer | prefetch | staged until used (engine) | evict LRU on prefetch |")
    print("|---|---|---|---|")
    for k, p, staged, alternative in rule_rows:
        print(f"| {k} | {p} | {staged:.1%} | {alternative:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
