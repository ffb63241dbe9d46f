#!/usr/bin/env python
"""Profile the expert cache while generating: hit rate per layer, prefetch quality, where each token's time goes.

    python scripts/profile_cache.py MODEL|--demo [--config NAME|FILE] [--device cpu|cuda] [--cache-dir DIR] [--yes]
        [--prompts FILE] [--max-new-tokens N] [--experts-on-device K] [--prefetch N] [--policy NAME] [--threads N]
        [--out report.json] [--trace routing.npz] [--guess-distances 1 2 3] [--plot F.png]

The report's routing is a trace of your model: `python scripts/simulate_cache.py report.json` replays it through
the cache policies and `python scripts/throughput_model.py report.json` through the engine's own cache with timed
copies on a stated GPU (the report records what the model's copies and kernels move). `--trace` also writes it in
the shared npz format.

MODEL is named as for offload-chat: a local checkpoint directory (any family in the README's table, or one
converted by scripts/quantize.py), `demo` or --demo (the demo's one set-up, as in offload-chat), or a hub repo id
(a source repo is converted once into the same cache as offload-chat's). Without --config: the default config
(4 experts per layer on the device, prefetch 1), the demo's set-up for the demo, a converted checkpoint's own.
Prompts: one per line of FILE; without --prompts, four built-in prompts. A model without tokenizer files gets token ids instead: each line of FILE is then a list of
integers, and the default is four random prompts (seeded by --seed). Every prompt is decoded greedily.

What is measured: the engine's own cache counters, for the single-token decode steps only (the prefill is reported
separately: it fetches each expert once for the whole prompt, so its hit rate means something else). The routing and
the prefetch guesses are recorded through ``OffloadedModel.forward(..., on_routing=...)``, which reports per layer
the experts routed to and the experts guessed for that layer before it ran. Per decode step, time is split into
  * copies:  CPU device: time inside the cache's (synchronous) copies, timed by wrapping ``ExpertCache._copy`` on this
             instance; CUDA: the host's wait for in-flight copies (the counters' ``wait_s``). Copies that overlap
             compute on CUDA cost nothing visible and are not counted (they cannot be timed from the host);
  * compute: the rest of the forward pass (attention, router, experts, lm_head, cache bookkeeping); on CPU the expert
             share (dequantize + 3 matmuls) is also timed, by wrapping ``offload_engine.model.expert_forward``;
  * other:   decode wall time outside the forward pass (sampling, the generate loop).
Host ms per MoE layer (what the throughput model's replay takes as input): the forward's time minus the time the
host was blocked reading routing (CUDA), or minus the timed expert kernels and copies (CPU: there it still holds
attention and the router, computed on the host), per decode step and MoE layer.

JSON report (``--out``), schema_version 1; every counter is summed over the decode steps of all prompts:
  schema_version  1
  model           MODEL as given
  command         the command line
  config          the engine config as loaded (experts_on_device resolved to a number)
  machine         {platform, python, torch, device, device_name, cpu_threads, load_average}
  num_layers, num_experts, top_k
  prompts         [{text (null for token ids), prompt_ids, generated_ids, decode_steps, first_step}]; first_step is the
                  index in ``routing`` of the prompt's first decode step
  tokens          number of decode steps (single-token forward passes) = len(routing) = len(guesses)
  routing         [step][layer] -> expert ids routed, in routed order (``simulate.routing_from_report`` loads it)
  guesses         [step][layer] -> expert ids guessed for that layer before it ran ([] when nothing was guessed)
  per_layer       [layer] -> {lookups, hits, misses, evictions, prefetch_issued, prefetch_used, prefetch_wasted,
                  guessed, guessed_correct, needed_after_guess, bytes_h2d, bytes_d2h, wait_s, cpu_computed, cpu_ms,
                  hit_rate, prefetch_precision, prefetch_recall}  (``Engine.stats()`` fields; rates recomputed from
                  the sums; cpu_computed: misses computed on the CPU from their host slot, cpu_ms: the worker's time)
  cpu_compute     hybrid execution as the engine reports it (``Engine.stats()["cpu_compute"]``: mode, calibration)
  overall         the same fields summed over layers
  prefill         {prompt_tokens, seconds, overall}
  timing          {decode_steps, generated_tokens, decode_seconds, decode_tokens_per_s, total_seconds,
                  end_to_end_tokens_per_s, copy_timing, per_token_ms: {total, compute, copies, experts, other},
                  host_ms_per_layer, host_timing, step_forward_ms: [per step]}; ``experts`` (and on CUDA nothing
                  else) may be null: not measurable
  costs           what a decode step of this model moves (replay.ModelCosts: expert_bytes, expert_kernel_bytes,
                  expert_kernel_bytes_per_token, trunk_bytes_per_layer, kv_bytes_per_layer, head_bytes)
  guess_distances with --guess-distances: {distance: {"1": {precision, recall, guesses}, "<top_k>": ...}}: guessing
                  the MoE layer `distance` layers ahead from the residual after this layer's attention, with 1 and
                  top_k guesses, teacher-forced on the generated tokens
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from offload_engine import cache_stats, load, load_config  # noqa: E402
from offload_engine.model_args import add_model_arguments, parse_model_args, resolve_setup  # noqa: E402
from offload_engine.config import ConfigLike  # noqa: E402
from offload_engine.engine import Engine  # noqa: E402
from offload_engine.errors import UsageError, add_debug_flag, user_errors  # noqa: E402
from offload_engine.expert_cache import LayerStats  # noqa: E402
from offload_engine.generate import SamplingParams, check_token_ids, generate_tokens  # noqa: E402
from offload_engine.profiling import Recorder, add_stats, guess_quality  # noqa: E402
from offload_engine.simulate import routing_from_report  # noqa: E402
from offload_engine.throughput import costs_of  # noqa: E402

SCHEMA_VERSION = 1
DEFAULT_PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Explain in two sentences why the sky is blue.",
    "Translate into French: the weather is nice today, so we are going to the beach.",
]
with_rates = cache_stats.with_rates  # counters plus the rates Engine.stats() derives (one definition)


def read_prompts(path: str | None, engine: Engine, n_random: int, length: int,
                 seed: int) -> list[tuple[str | None, list[int]]]:
    """[(text or None, token ids)] from a file, the built-in prompts, or seeded random ids (no tokenizer)."""
    if path is not None:
        try:
            lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompts {path} is not UTF-8 text ({e}); give a text file, one prompt per line") from e
        if not lines:
            raise UsageError(f"--prompts {path} has no prompts (one per line)")
        if engine.tokenizer is not None:
            return [(line, engine.encode(line)) for line in lines]
        vocab = engine.model.config.vocab_size
        try:
            return [(None, check_token_ids([int(t) for t in line.replace(",", " ").split()], vocab)) for line in lines]
        except ValueError as e:
            raise UsageError(f"this model has no tokenizer, so each line of --prompts {path} must be token ids "
                             f"(integers from 0 to {vocab - 1} separated by spaces): {e}") from None
    if engine.tokenizer is not None:
        return [(text, engine.encode(text)) for text in DEFAULT_PROMPTS]
    vocab = engine.model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    return [(None, torch.randint(0, vocab, (length,), generator=gen).tolist()) for _ in range(n_random)]


def machine_info(engine: Engine) -> dict:
    device = engine.device
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device), "cpu_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine()}


def profile(engine: Engine, prompts: list[tuple[str | None, list[int]]], max_new_tokens: int,
            ignore_eos: bool = False) -> dict:
    """Generate greedily for every prompt and return the report (without model/command/config keys)."""
    rec = Recorder(engine)
    n_layers = len(engine.model.moe_layers)
    decode_stats = [LayerStats() for _ in range(n_layers)]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    eos = () if ignore_eos else engine.eos_ids
    prompt_info, decode_wall, total_wall, generated = [], 0.0, 0.0, 0
    with rec.instrumented() as timed_on_cpu:
        for text, ids in prompts:
            if len(ids) + max_new_tokens > engine.context_window:
                raise UsageError(f"a prompt of {len(ids)} tokens + --max-new-tokens {max_new_tokens} exceeds the "
                                 f"context window ({engine.context_window}); lower --max-new-tokens")
            first_step = len(rec.routing)
            rec.start_prompt(len(ids))
            kv_cache = DynamicCache(config=engine.model.config)
            start = time.perf_counter()
            out = list(generate_tokens(rec, ids, params, kv_cache, eos))
            end = time.perf_counter()
            total_wall += end - start
            decode_wall += end - rec.prefill_end
            generated += len(out)
            add_stats(decode_stats, engine)
            prompt_info.append({"text": text, "prompt_ids": ids, "generated_ids": out,
                                "decode_steps": len(rec.routing) - first_step, "first_step": first_step})
    engine.reset_stats()
    total, prefill_total = cache_stats.total(decode_stats), cache_stats.total(rec.prefill_stats)

    steps = len(rec.routing)
    forward = sum(rec.forward_s)
    if timed_on_cpu:
        copies, copy_how = rec.copy_s, "cpu: synchronous copies inside ExpertCache._copy, timed (host memcpy, no PCIe)"
    elif engine.device.type == "cuda":
        copies, copy_how = total.wait_s, "cuda: host wait for in-flight copies (wait_s); overlapped copies not visible"
    else:
        copies, copy_how = None, "not measurable: ExpertCache._copy not found to instrument"
    per_token = lambda x: None if x is None or not steps else 1e3 * x / steps  # noqa: E731
    if engine.device.type == "cuda":
        host_s, host_how = forward - rec.blocked_s, "cuda: forward time minus the host's blocked reads"
    elif timed_on_cpu:
        host_s, host_how = forward - rec.copy_s - rec.expert_s, ("cpu: forward time minus the timed expert kernels "
                                                                  "and copies (attention and routers included)")
    else:
        host_s, host_how = None, "not measurable"
    host_ms = None if host_s is None or not steps else 1e3 * host_s / steps / n_layers
    timing = {
        "decode_steps": steps, "generated_tokens": generated, "decode_seconds": decode_wall,
        "decode_tokens_per_s": steps / decode_wall if decode_wall > 0 else 0.0, "total_seconds": total_wall,
        "end_to_end_tokens_per_s": generated / total_wall if total_wall > 0 else 0.0, "copy_timing": copy_how,
        "per_token_ms": {"total": per_token(decode_wall), "compute": per_token(forward - (copies or 0.0)),
                         "copies": per_token(copies), "experts": per_token(rec.expert_s) if timed_on_cpu else None,
                         "other": per_token(decode_wall - forward)},
        "host_ms_per_layer": host_ms, "host_timing": host_how,
        "step_forward_ms": [round(1e3 * s, 4) for s in rec.forward_s],
    }
    anatomy = engine.model.anatomy
    return {
        "schema_version": SCHEMA_VERSION, "machine": machine_info(engine), "num_layers": n_layers,
        "family": anatomy.family.model_type, "num_experts": anatomy.num_experts, "top_k": anatomy.top_k,
        "prompts": prompt_info,
        "tokens": steps, "routing": rec.routing, "guesses": rec.guesses,
        "per_layer": [with_rates(s) for s in decode_stats], "overall": with_rates(total),
        "prefill": {"prompt_tokens": sum(len(ids) for _, ids in prompts), "seconds": rec.prefill_s,
                    "overall": with_rates(prefill_total)},
        "timing": timing, "costs": dataclasses.asdict(costs_of(engine.model.config, engine.config)),
        "cpu_compute": engine.stats()["cpu_compute"],
    }


def format_report(report: dict) -> str:
    cfg, t, m = report["config"], report["timing"], report["machine"]
    off, q, prefill = cfg["offload"], cfg["quant"], report["prefill"]
    lines = [
        f"$ {report['command']}",
        f"machine: {m['platform']}, {m['device_name']}, device {m['device']}, torch {m['torch']}, "
        f"{m['cpu_threads']} threads, load average {m['load_average']}",
        f"model: {report['model']} ({report['num_layers']} layers, {report['num_experts']} experts, "
        f"top-{report['top_k']})",
        f"config: {off['experts_on_device']} experts/layer on device, prefetch {off['prefetch']}, "
        f"policy {off['policy']}, experts {q['experts']['bits']}-bit g{q['experts']['group_size']}, {cfg['dtype']}",
        f"prompts: {len(report['prompts'])} ({prefill['prompt_tokens']} tokens, prefill {prefill['seconds']:.2f} s, "
        f"prefill hit rate {100 * prefill['overall']['hit_rate']:.1f} %); "
        f"{t['generated_tokens']} tokens generated, {t['decode_steps']} decode steps",
        "",
        "decode steps, per layer (engine counters):",
        f"{'layer':>5} {'lookups':>8} {'hits':>6} {'misses':>7} {'hit %':>6} {'pf issued':>9} {'used':>5} "
        f"{'wasted':>6} {'precision':>9} {'recall':>6} {'on cpu':>6} {'cpu ms':>8}",
    ]
    rows = list(enumerate(report["per_layer"])) + [("all", report["overall"])]
    for name, s in rows:
        lines.append(f"{name:>5} {s['lookups']:>8} {s['hits']:>6} {s['misses']:>7} {100 * s['hit_rate']:>6.1f} "
                     f"{s['prefetch_issued']:>9} {s['prefetch_used']:>5} {s['prefetch_wasted']:>6} "
                     f"{100 * s['prefetch_precision']:>8.1f}% {100 * s['prefetch_recall']:>5.1f}% "
                     f"{s.get('cpu_computed', 0):>6} {s.get('cpu_ms', 0.0):>8.2f}")
    o = report["overall"]
    if "cpu_compute" in report:
        lines.append(f"cpu_compute {report['cpu_compute']}: {o.get('cpu_computed', 0)} missed experts computed on "
                     f"the CPU from their host slot ({o.get('cpu_ms', 0.0):.1f} ms of worker time), not copied")
    if not o["guessed"]:
        lines.append("(prefetch off or no guesses made: precision and recall are 0 by definition)")
    else:
        overall = cache_stats.counters(o)
        lines.append(f"all layers: {cache_stats.precision_text(overall)}, {cache_stats.recall_text(overall)}; "
                     f"{o['prefetch_issued']} experts copied ahead of need, {o['prefetch_used']} of them used")
    ms = t["per_token_ms"]
    fmt = lambda x: "   n/a" if x is None else f"{x:6.2f}"  # noqa: E731
    lines += [
        "",
        f"decode: {t['decode_tokens_per_s']:.2f} tokens/s ({t['end_to_end_tokens_per_s']:.2f} tokens/s end to end, "
        f"prefill included); copied {o['bytes_h2d'] / 2**20:.1f} MiB host->device, "
        f"{o['bytes_d2h'] / 2**20:.1f} MiB back",
        "time per decode step (ms):",
        f"  total    {fmt(ms['total'])}",
        f"  compute  {fmt(ms['compute'])}   forward pass minus copies; of which experts {fmt(ms['experts']).strip()} "
        "(dequantize + 3 matmuls" + (", timed)" if ms["experts"] is not None else ": not measurable here)"),
        f"  copies   {fmt(ms['copies'])}   {t['copy_timing']}",
        f"  other    {fmt(ms['other'])}   sampling and the generate loop (wall time outside the forward pass)",
        f"host ms per MoE layer: {fmt(t['host_ms_per_layer']).strip()} ({t['host_timing']})",
    ]
    for d, by_count in report.get("guess_distances", {}).items():
        lines.append(f"guessing {d} MoE layer(s) ahead: " + "; ".join(
            f"{c} guess(es) precision {100 * q['precision']:.1f} %, recall {100 * q['recall']:.1f} %"
            for c, q in by_count.items()))
    return "\n".join(lines)


def plot_hit_rates(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [100 * s["hit_rate"] for s in report["per_layer"]]
    overall = 100 * report["overall"]["hit_rate"]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rates) + 2), 3.5))
    ax.bar(range(len(rates)), rates, color="#4477aa")
    ax.axhline(overall, color="#cc6677", linestyle="--", label=f"overall {overall:.1f} %")
    off = report["config"]["offload"]
    ax.set(xlabel="layer", ylabel="hit rate (%)", ylim=(0, 100), xticks=range(0, len(rates), max(1, len(rates) // 16)),
           title=f"expert-cache hit rate per layer, decode steps\n({off['experts_on_device']} experts/layer, "
                 f"prefetch {off['prefetch']}, {off['policy']}, {report['tokens']} steps)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def with_offload(config: ConfigLike, overrides: dict) -> ConfigLike:
    """`config` with the --experts-on-device/--prefetch/--policy overrides; for a converted checkpoint (config
    None) only the overrides, which its own config takes in."""
    if not overrides:
        return config
    if config is None:
        return {"offload": overrides}
    full = load_config(config).to_dict()
    return {**full, "offload": {**full["offload"], **overrides}}


@user_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(ap, "profile the small demo model shipped in the package",
                        config_default="the defaults (4 experts per layer on the device, prefetch 1)")
    ap.add_argument("--prompts", help="file with one prompt per line (token ids per line for tokenizer-less models)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--experts-on-device", type=int, help="override offload.experts_on_device")
    ap.add_argument("--prefetch", type=int, help="override offload.prefetch")
    ap.add_argument("--policy", help="override offload.policy")
    ap.add_argument("--cpu-compute", choices=("auto", "off", "always"), help="override offload.cpu_compute")
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    ap.add_argument("--num-random-prompts", type=int, default=4, help="tokenizer-less models without --prompts")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="length of the random prompts")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    ap.add_argument("--out", help="write the JSON report here")
    ap.add_argument("--plot", help="write a PNG bar chart of the hit rate per layer (needs matplotlib)")
    ap.add_argument("--trace", help="also write the decode routing as an npz trace (the shared format)")
    ap.add_argument("--guess-distances", type=int, nargs="+", metavar="D",
                    help="also measure guessing D MoE layers ahead (precision, recall), e.g. 1 2 3")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice). On a busy machine, 1 "
                    "avoids OpenMP barriers waiting for a descheduled thread on tiny ops")
    ap.add_argument("--quiet", action="store_true", help="no loading progress bar")
    add_debug_flag(ap)
    args = parse_model_args(ap, argv)
    if any(d < 1 for d in args.guess_distances or []):
        ap.error("--guess-distances takes distances >= 1")
    for option in ("max_new_tokens", "num_random_prompts", "prompt_tokens", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            ap.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("--plot needs matplotlib: pip install matplotlib (or pip install 'offload_engine[plot]')")

    if args.prompts is not None and not Path(args.prompts).is_file():  # before minutes of loading
        raise UsageError(f"--prompts {args.prompts} does not exist; give a text file with one prompt per line")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    setup = resolve_setup(args, default_config=lambda device: None)
    overrides = {k: v for k, v in {"experts_on_device": args.experts_on_device, "prefetch": args.prefetch,
                                   "policy": args.policy, "cpu_compute": args.cpu_compute}.items() if v is not None}
    config = with_offload(setup.config, overrides)
    if setup.window is not None and args.max_new_tokens >= setup.window:  # checked again per prompt; now: early
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the context window "
                         f"({setup.window} tokens); lower it")
    engine = load(setup.model_dir, config=config, device=setup.device, progress=not args.quiet)
    prompts = read_prompts(args.prompts, engine, args.num_random_prompts, args.prompt_tokens, args.seed)
    body = profile(engine, prompts, args.max_new_tokens, args.ignore_eos)
    argv_shown = sys.argv[1:] if argv is None else argv
    report = {"schema_version": SCHEMA_VERSION, "model": "demo" if args.demo else str(args.model),
              "command": "python scripts/profile_cache.py " + " ".join(shlex.quote(a) for a in argv_shown),
              "config": engine.config.to_dict(), **{k: v for k, v in body.items() if k != "schema_version"}}
    if args.guess_distances:
        report["guess_distances"] = guess_quality(engine, report["prompts"], sorted(set(args.guess_distances)))
    print(format_report(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"report: {args.out}")
    if args.trace:
        Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
        with open(args.trace, "wb") as f:  # np.savez would append .npz to another suffix
            np.savez(f, **{f"{Path(args.trace).stem}_experts": routing_from_report(report)})
        print(f"trace: {args.trace}")
    if args.plot:
        plot_hit_rates(report, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
