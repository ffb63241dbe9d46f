#!/usr/bin/env python
"""Bounded soak: thousands of short generations with random valid and invalid parameters and random interrupts.

    PYTHONPATH=. python scripts/soak.py [MODEL] [--iterations N] [--experts-on-device K] [--prefetch P]
        [--interrupt-rate R] [--invalid-rate R] [--hooks expert copy sample abandon] [--seed S] [--threads N]
        [--kernels auto|fused|reference]

MODEL defaults to the packaged demo model. Each iteration picks one of:
  * a valid call (generate_ids / stream / a chat turn, random greedy or sampled parameters, 1-8 new tokens);
  * an invalid call (a bad sampling parameter or token id) that must be refused with ValueError/TypeError;
  * an interrupted call: a hook raises KeyboardInterrupt at a random point (inside an expert's compute, inside a
    cache copy, or in the sampler), or the caller abandons a stream half way.
Every `--check-every` iterations it records resident memory (RSS) and the cache's slot accounting (device slots
held by some expert or free must add up to all of them; free spares must be back to their count at rest). At the
end greedy tokens must equal a freshly loaded engine's. Exit status 1 if anything crashed, leaked or diverged.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import random
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

import offload_engine  # noqa: E402
import offload_engine.generate as generate_module  # noqa: E402
import offload_engine.model as model_module  # noqa: E402
from offload_engine.checkpoint import DEMO_DIR  # noqa: E402
from offload_engine.errors import add_debug_flag, user_errors  # noqa: E402

INVALID = [  # (sampling options, prompt ids or None for a valid prompt)
    ({"max_new_tokens": 2.5}, None), ({"max_new_tokens": "5"}, None), ({"max_new_tokens": 0}, None),
    ({"seed": "abc"}, None), ({"seed": 2**70}, None), ({"top_k": 2.5}, None), ({"top_k": -1}, None),
    ({"stop": 5}, None), ({"temperature": math.nan}, None), ({"temperature": -1.0}, None),
    ({"top_p": 0.0}, None), ({"top_p": math.nan}, None), ({"repetition_penalty": 0}, None), ({"bogus": 1}, None),
    ({}, "vocab"), ({}, [-1]), ({}, [3, 2.0]), ({}, []), ({}, [7, "7"]),
]
HOOKS = ("expert", "copy", "sample", "abandon")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def slot_report(cache) -> dict:
    """Device-slot accounting at rest: every slot is held by a resident expert or free, nothing staged or lent
    (plus the cache's own `check_invariant()`, where it has one)."""
    count = lambda name: sum(len(d) for d in getattr(cache, name, []))  # noqa: E731
    report = {"free": len(cache.free_slots), "held": count("main"), "staged": count("staged"),
              "transient": count("transient"), "total": len(cache.slots)}
    report["ok"] = (report["held"] + report["free"] == report["total"] and report["staged"] == report["transient"] == 0)
    check = getattr(cache, "check_invariant", None)
    if check is not None:
        try:
            check()
        except Exception as e:  # noqa: BLE001 - reported, not raised
            report["ok"], report["invariant_error"] = False, f"{type(e).__name__}: {e}"
    return report


class Interrupter:
    """Raises KeyboardInterrupt on the n-th call of a hooked function (expert compute, cache copy, sampler)."""

    def __init__(self, engine):
        self.engine, self.countdown, self.where = engine, -1, None

    def arm(self, where: str, after: int) -> None:
        self.where, self.countdown = where, after

    def disarm(self) -> None:
        self.where, self.countdown = None, -1

    def tick(self, where: str) -> None:
        if self.where == where:
            self.countdown -= 1
            if self.countdown == 0:
                self.disarm()
                raise KeyboardInterrupt(f"soak: injected in {where}")

    @contextmanager
    def installed(self) -> Iterator[None]:
        expert_forward, sample = model_module.expert_forward, generate_module.sample
        copy = getattr(self.engine.cache, "_copy", None)  # the cache's host<->device copy, where it has one

        def hooked(name, fn):
            def wrapper(*args, **kwargs):
                self.tick(name)
                return fn(*args, **kwargs)
            return wrapper

        model_module.expert_forward = hooked("expert", expert_forward)
        generate_module.sample = hooked("sample", sample)
        if copy is not None:
            self.engine.cache._copy = hooked("copy", copy)
        try:
            yield
        finally:
            model_module.expert_forward, generate_module.sample = expert_forward, sample
            if copy is not None:
                del self.engine.cache._copy


def random_sampling(rng: random.Random) -> dict:
    options = {"max_new_tokens": rng.randint(1, 8)}
    if rng.random() < 0.5:
        options.update(temperature=rng.uniform(0.1, 1.5), top_p=rng.uniform(0.3, 1.0), top_k=rng.choice([0, 5, 50]),
                       seed=rng.randrange(2**32))
    if rng.random() < 0.2:
        options["repetition_penalty"] = rng.uniform(1.0, 1.5)
    return options


def random_prompt(rng: random.Random, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))]


def one_call(engine, rng: random.Random, prompt, sampling: dict, abandon: bool, bad_prompt: bool) -> None:
    """One generation: token ids, a text stream, or a chat turn (a bad prompt is always given as ids)."""
    mode = rng.choice(["ids", "stream", "chat"] if engine.tokenizer is not None and not bad_prompt else ["ids"])
    if mode == "ids":
        engine.generate_ids(prompt, **sampling)
        return
    if mode == "stream":
        text = engine.tokenizer.decode(prompt) or "hello"
        stream = engine.stream(text, **sampling)
    else:
        session = engine.chat()
        stream = session.stream(engine.tokenizer.decode(prompt) or "hello", **sampling)
    for i, _ in enumerate(stream):
        if abandon and i >= rng.randint(0, 2):
            break  # dropped half way: the stream is finalised and must give the engine back
    stream = None


@user_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=str(DEMO_DIR), help="checkpoint directory (default: the demo model)")
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--experts-on-device", type=int, default=4)
    ap.add_argument("--prefetch", type=int, default=1)
    ap.add_argument("--interrupt-rate", type=float, default=0.2, help="share of calls interrupted")
    ap.add_argument("--invalid-rate", type=float, default=0.2, help="share of calls with an invalid parameter")
    ap.add_argument("--hooks", nargs="+", default=list(HOOKS), choices=HOOKS, help="where interrupts are injected")
    ap.add_argument("--check-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--kernels", default="auto", help="config key kernels: auto | fused | reference")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    if args.iterations < 1 or args.check_every < 1:
        ap.error("--iterations and --check-every must be >= 1")
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    config = {"dtype": "float32", "kernels": args.kernels,
              "offload": {"experts_on_device": args.experts_on_device, "prefetch": args.prefetch}}
    engine = offload_engine.load(args.model, config, device="cpu", progress=False)
    vocab = engine.model.config.vocab_size
    interrupter = Interrupter(engine)
    counts = {"ok": 0, "rejected": 0, "interrupted": 0, "abandoned": 0, "crashed": 0, "not_rejected": 0}
    crashes: list[str] = []
    checkpoints: list[dict] = []
    probe = [random_prompt(random.Random(i), vocab) for i in range(3)]
    start = time.perf_counter()
    with interrupter.installed():
        for it in range(1, args.iterations + 1):
            prompt, sampling = random_prompt(rng, vocab), random_sampling(rng)
            roll = rng.random()
            kind = "invalid" if roll < args.invalid_rate else (
                "interrupt" if roll < args.invalid_rate + args.interrupt_rate else "valid")
            if kind == "invalid":
                bad_options, bad_prompt = rng.choice(INVALID)
                sampling = {**sampling, **bad_options}
                prompt = [vocab] if bad_prompt == "vocab" else (bad_prompt if bad_prompt is not None else prompt)
                bad_prompt = bad_prompt is not None
            else:
                bad_prompt = False
            hook = rng.choice(args.hooks) if kind == "interrupt" else None
            if hook in ("expert", "copy", "sample"):  # the n-th call, within the calls one short generation makes
                interrupter.arm(hook, rng.randint(1, {"expert": 40, "copy": 6, "sample": 4}[hook]))
            try:
                one_call(engine, rng, prompt, sampling, abandon=hook == "abandon", bad_prompt=bad_prompt)
                counts["not_rejected" if kind == "invalid" else "abandoned" if hook == "abandon" else "ok"] += 1
                if kind == "invalid":
                    crashes.append(f"iteration {it}: invalid call accepted: {sampling} prompt {prompt}")
            except KeyboardInterrupt:
                counts["interrupted"] += 1
            except (ValueError, TypeError) as e:
                if kind == "invalid":
                    counts["rejected"] += 1
                else:
                    counts["crashed"] += 1
                    crashes.append(f"iteration {it}: {type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 - the point of a soak: count, report, go on
                counts["crashed"] += 1
                crashes.append(f"iteration {it}: {type(e).__name__}: {e}")
            interrupter.disarm()
            if engine.lock.locked:
                crashes.append(f"iteration {it}: the engine lock is still held after the call")
                counts["crashed"] += 1
            if it % args.check_every == 0 or it == args.iterations:
                gc.collect()
                checkpoints.append({"iteration": it, "rss_mib": rss_mib(), **slot_report(engine.cache)})
    elapsed = time.perf_counter() - start

    fresh = offload_engine.load(args.model, config, device="cpu", progress=False)
    try:
        exact = all(engine.generate_ids(p, max_new_tokens=8) == fresh.generate_ids(p, max_new_tokens=8) for p in probe)
    except Exception as e:  # noqa: BLE001 - a broken engine is a result
        exact = False
        crashes.append(f"final exactness check: {type(e).__name__}: {e}")

    argv_shown = sys.argv[1:] if argv is None else argv
    print("$ python scripts/soak.py " + " ".join(shlex.quote(a) for a in argv_shown))
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; device cpu, float32, batch 1")
    print(f"model: {args.model}; {engine.cache.k}/{engine.cache.num_experts} experts/layer on device, prefetch "
          f"{engine.cache.prefetch_count}; {len(engine.cache.slots)} device slots; kernels {args.kernels}")
    print(f"{args.iterations} iterations in {elapsed:.1f} s: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"{'iteration':>9} {'RSS MiB':>8} {'free':>5} {'held':>5} {'total':>5} {'staged':>6} {'transient':>9} ok")
    for c in checkpoints:
        print(f"{c['iteration']:>9} {c['rss_mib']:>8.1f} {c['free']:>5} {c['held']:>5} {c['total']:>5} "
              f"{c['staged']:>6} {c['transient']:>9} {c['ok']}" + (f"  {c['invariant_error']}" if
                                                                       "invariant_error" in c else ""))
    settled = checkpoints[len(checkpoints) // 4:] or checkpoints  # past warm-up (allocator, thread pools)
    growth = settled[-1]["rss_mib"] - settled[0]["rss_mib"]
    print(f"RSS after warm-up: {settled[0]['rss_mib']:.1f} -> {settled[-1]['rss_mib']:.1f} MiB "
          f"({growth:+.1f} MiB); greedy tokens after the soak equal a fresh engine's: {exact}")
    for line in crashes[:10]:
        print("crash:", line)
    failed = counts["crashed"] or counts["not_rejected"] or not exact or not all(c["ok"] for c in checkpoints)
    print("FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
