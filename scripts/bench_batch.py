"""Batched generation through the Python API: aggregate tokens/s, time to first token and inter-token latency for
batches of 1, 2, 4 and 8 prompts (Engine.generate with a list; the same scheduler offload-serve runs).

    python scripts/bench_batch.py [--batches 1 2 4 8] [--new-tokens 64] [--threads 2] [--model-dir DIR]
                                  [--hidden 1024 --intermediate 3584 --layers 4 --vocab 32000] [--bits 4/2]
    python scripts/bench_batch.py --demo

Without --demo it builds the random Mixtral-architecture model of scripts/bench_generate.py (hidden 1024,
intermediate 3584, 4 layers, 8 experts top-2, vocab 32000) and quantizes it (4-bit attention, 2-bit experts; HQQ's
optimiser takes minutes on 2 cores) into --model-dir, which a later run reuses; Mixtral's tokenizer (from
mistral-common, when installed) goes with it, so that `offload-serve --model-dir` and scripts/load_test.py can
serve the same model. Each batch size runs `--repeats`
times (sizes taking turns, so a burst of load from another process hits one repeat of each) and the best repeat
is reported. Prompts are 8-24 random tokens (different lengths), generation greedy and exactly --new-tokens long (EOS does
not stop it), through the scheduler `Engine.generate` with a list runs (generate.generate_batch).
Per sequence: TTFT = start -> its first token, inter-token latency = the gaps between its tokens; p50/p95 over all
sequences' gaps; expert-cache lookups and copies (misses) per generated token, prefill included. Prints the
command, the machine, the load average before and after, and a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import offload_engine  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from offload_engine.generate import SamplingParams, generate_batch, new_sequence  # noqa: E402

from bench_generate import machine, set_up  # noqa: E402


# Mixtral-8x7B-Instruct's chat template (as tests/conftest.py holds it), so that offload-serve can chat with it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content']"
    " + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}")


def add_tokenizer(model_dir: Path) -> None:
    """Mixtral's own tokenizer (32000 tokens, as the bench model's vocabulary), from mistral-common's copy of
    tokenizer.model, so that offload-serve and scripts/load_test.py can serve the bench model; skipped (with a
    note) without mistral-common."""
    if (model_dir / "tokenizer_config.json").exists():
        return
    try:
        import mistral_common
        from transformers import LlamaTokenizer
    except ImportError:
        print("note: no mistral-common, so the bench model has no tokenizer (the API benchmark needs none; "
              "offload-serve does)")
        return
    source = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(source.read_bytes())
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)


def build_model(args: argparse.Namespace, model_dir: Path) -> Path:
    """The bench model, quantized once into `model_dir` (reused when it is already there), with a tokenizer."""
    if (model_dir / "offload_manifest.json").exists():
        add_tokenizer(model_dir)
        return model_dir
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                           num_local_experts=8, num_experts_per_tok=2, eos_token_id=None)
    attention, experts = (int(b) for b in args.bits.split("/"))
    quant = {"attention": {"bits": attention, "group_size": 64}, "experts": {"bits": experts, "group_size": 16}}
    with tempfile.TemporaryDirectory() as tmp:
        MixtralForCausalLM(config).save_pretrained(tmp)
        print(f"quantizing the bench model into {model_dir} (once) ...", flush=True)
        offload_engine.quantize_checkpoint(tmp, model_dir, {"dtype": args.dtype, "quant": quant}, progress=False)
    add_tokenizer(model_dir)
    return model_dir


def run(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """One batch, timed per token."""
    config = engine.model.config  # EOS is not in the sequences' stop set: each generates exactly new_tokens
    sequences = [new_sequence(p, SamplingParams(max_new_tokens=new_tokens), DynamicCache(config=config))
                 for p in prompts]
    stamps: list[list[float]] = [[] for _ in prompts]
    engine.reset_stats()
    start = time.perf_counter()
    with engine.lock:
        for i, token in generate_batch(engine.model, sequences, len(prompts)):
            if token is not None:
                stamps[i].append(time.perf_counter())
    wall = time.perf_counter() - start
    tokens = sum(len(s) for s in stamps)
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    cache = engine.stats()["overall"]
    return {"wall": wall, "tokens": tokens, "lookups": cache["lookups"], "copies": cache["misses"],
            "ttft": [s[0] - start for s in stamps], "gaps": gaps,
            "itl_per_seq": [statistics.median([b - a for a, b in zip(s, s[1:])]) for s in stamps]}


def profile(engine, prompts: list[list[int]], new_tokens: int) -> None:
    """Milliseconds per step of the functions that take the time (cProfile's own time, and cumulative for the
    experts), for one batch of `prompts`."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(run, engine, prompts, new_tokens)
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive calls, own s, cumulative s, ...)}
    print(f"\nbatch {len(prompts)}: ms per step ({new_tokens} steps), top functions by own time")
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:12]
    expert = next((v for k, v in stats.items() if k[2] == "expert_forward"), None)
    for (file, line, name), (calls, _, own, cumulative, _) in rows:
        print(f"  {own / new_tokens * 1e3:7.2f} ms  {calls / new_tokens:6.1f} calls  {Path(file).name}:{line} {name}")
    if expert is not None:
        print(f"  experts (expert_forward, cumulative): {expert[3] / new_tokens * 1e3:.2f} ms per step, "
              f"{expert[0] / new_tokens:.1f} calls")


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="the packaged demo model, configured as offload-serve "
                                                            "--demo (--experts-on-device, --prefetch ignored)")
    parser.add_argument("--model-dir", type=Path, help="where the quantized bench model is kept (default: a "
                                                       "temporary directory)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bits", default="4/2", help="attention/experts bits (default 4/2)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--experts-on-device", type=int, default=8)
    parser.add_argument("--prefetch", type=int, default=0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--profile", type=int, metavar="B", help="instead: one batch of B under cProfile, and where "
                                                                    "its time per step goes")
    args = parser.parse_args()
    set_up(args)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.demo:  # configured as offload-chat / offload-serve --demo configure it: load()'s demo set-up
            from offload_engine.checkpoint import DEMO_DIR

            source, config = DEMO_DIR, None
        else:
            source = build_model(args, args.model_dir or Path(tmp) / "bench")
            config = {"offload": {"experts_on_device": args.experts_on_device, "prefetch": args.prefetch}}
        engine = offload_engine.load(source, config=config, device="cpu", progress=False)
        hf = engine.model.config
        print(f"model: {source.name if args.demo else 'bench'}: hidden {hf.hidden_size}, {hf.num_hidden_layers} "
              f"layers, vocab {hf.vocab_size}; {engine.config.dtype}, attention/experts bits "
              f"{engine.config.quant.attention.bits}/{engine.config.quant.experts.bits}, kernels "
              f"{engine.stats()['kernels']}, {engine.cache.k} of {engine.cache.num_experts} experts per layer on "
              f"device, prefetch {engine.cache.prefetch_count}; {args.new_tokens} new tokens, greedy")
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, hf.vocab_size, (8 + (5 * i) % 17,), generator=gen).tolist()
                   for i in range(max(args.batches))]
        run(engine, prompts[:1], 4)  # warm-up
        if args.profile:
            profile(engine, prompts[: args.profile], args.new_tokens)
            return
        best: dict[int, dict] = {}
        for _ in range(args.repeats):
            for b in args.batches:
                result = run(engine, prompts[:b], args.new_tokens)
                if b not in best or result["wall"] < best[b]["wall"]:
                    best[b] = result
    print(f"load average after: {os.getloadavg()[0]:.2f}; machine: {machine()}")
    one = best[min(args.batches)]
    print("\n| batch | tokens/s (all sequences) | vs batch 1 | TTFT p50 / p95 | inter-token p50 / p95 "
          "| worst sequence's median inter-token vs batch 1 | expert lookups / copies per token |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b, r in sorted(best.items()):
        rate = r["tokens"] / r["wall"]
        print(f"| {b} | {rate:.1f} | {rate / (one['tokens'] / one['wall']):.2f}x | "
              f"{pct(r['ttft'], 50) * 1e3:.0f} / {pct(r['ttft'], 95) * 1e3:.0f} ms | "
              f"{pct(r['gaps'], 50) * 1e3:.1f} / {pct(r['gaps'], 95) * 1e3:.1f} ms | "
              f"{max(r['itl_per_seq']) / statistics.median(one['itl_per_seq']):.2f}x | "
              f"{r['lookups'] / r['tokens']:.1f} / {r['copies'] / r['tokens']:.1f} |")


if __name__ == "__main__":
    main()
