"""Load test for offload-serve: N concurrent streaming chat clients for T seconds against a loopback server.

    PYTHONPATH=. python scripts/load_test.py --demo --clients 1 2 4 8 --duration 20    # starts its own server
    PYTHONPATH=. python scripts/load_test.py --url http://127.0.0.1:8000 --clients 8   # a running offload-serve
    PYTHONPATH=. python scripts/load_test.py --demo --compare-prefix-reuse --turns 8   # TTFT with/without reuse

Each client sends streaming chat requests back to back (a new conversation each, so requests do not extend one
another) until the duration is over; each request is bounded by --timeout. For each client count in turn (the
same server), reports p50/p95 end-to-end latency, time to first token (queue wait included) and inter-token
latency (the gaps between a reply's content chunks) as the client sees them, the worst client's median
inter-token gap, and the aggregate tokens/s over the run. An in-process server batches up to --max-batch
requests (offload-serve's default).

--compare-prefix-reuse runs one client through a --turns conversation (each request repeats the previous prompt
and reply and adds a question) twice: against a server with prefix reuse and one without, and reports the time
to first token of turns 2.. for both. Loopback only: --url must point at 127.0.0.1 / localhost.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import torch

from offload_engine.batch import MAX_BATCH
from offload_engine.errors import add_debug_flag, user_errors
from offload_engine.model_args import add_model_arguments, resolve_setup

QUESTIONS = ["Tell me about the history of the city.", "What is the best way to learn a language?",
             "Describe a walk in the mountains.", "Why do people like music?", "What happened next?",
             "How does a train work?", "Write about the sea.", "What is a good breakfast?"]


@dataclass
class Sample:
    latency: float  # request sent -> last chunk
    ttft: float  # request sent -> first content chunk
    tokens: int  # completion tokens (the server's usage)
    gaps: list[float] = field(default_factory=list)  # between consecutive content chunks
    client: int = 0


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sample: Sample | None = None, error: str | None = None) -> None:
        with self.lock:
            if sample is not None:
                self.samples.append(sample)
            if error is not None:
                self.errors[error] = self.errors.get(error, 0) + 1


def chat(client, model: str, messages: list[dict], max_tokens: int, seed: int | None) -> tuple[Sample, str]:
    start = time.perf_counter()
    stamps, text, tokens = [], [], 0
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, seed=seed,
                                            temperature=0.0 if seed is None else 0.8, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - start
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return Sample(latency, stamps[0] - start if stamps else latency, tokens, gaps), "".join(text)


def client_loop(client, model: str, args, index: int, deadline: float, run: Run) -> None:
    import openai

    n = 0
    while time.perf_counter() < deadline:
        messages = [{"role": "user", "content": QUESTIONS[(index + n) % len(QUESTIONS)]}]
        try:
            sample, _ = chat(client, model, messages, args.max_tokens, seed=1000 * index + n)
            sample.client = index
            run.add(sample)
        except openai.APIStatusError as e:
            run.add(error=f"HTTP {e.status_code}")
            time.sleep(0.1)  # a 429 says: retry later
        except openai.APIError as e:
            run.add(error=type(e).__name__)
        n += 1


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def report_load(run: Run, wall: float, clients: int, args) -> dict | None:
    s = run.samples
    if not s:
        print(f"no request completed; errors: {run.errors}")
        return None
    lat, ttft = [x.latency for x in s], [x.ttft for x in s]
    gaps = [g for x in s for g in x.gaps] or [0.0]
    per_client = [statistics.median(g) for c in range(clients) if (g := [g for x in s if x.client == c
                                                                       for g in x.gaps])]
    tokens = sum(x.tokens for x in s)
    row = {"clients": clients, "requests": len(s), "tokens_per_s": tokens / wall, "ttft": ttft, "latency": lat,
           "gaps": gaps, "worst_client_itl": max(per_client, default=0.0), "errors": dict(run.errors)}
    print(f"clients {clients}, {wall:.1f} s, max_tokens {args.max_tokens}: {len(s)} requests, "
          f"errors {run.errors or 'none'}")
    print(f"  latency  p50 {pct(lat, 50):.3f} s   p95 {pct(lat, 95):.3f} s")
    print(f"  TTFT     p50 {pct(ttft, 50):.3f} s   p95 {pct(ttft, 95):.3f} s   (queue wait included)")
    print(f"  inter-token p50 {pct(gaps, 50) * 1e3:.1f} ms   p95 {pct(gaps, 95) * 1e3:.1f} ms   worst client's "
          f"median {row['worst_client_itl'] * 1e3:.1f} ms")
    print(f"  tokens/s {tokens / wall:.1f} (all clients, {tokens} tokens); requests/s {len(s) / wall:.2f}")
    return row


def table(rows: list[dict]) -> None:
    """The runs as one markdown table, each client count against the first (one client, when it is first)."""
    base = rows[0]
    print("\n| clients | requests | tokens/s (all clients) | vs first row | TTFT p50 / p95 | inter-token p50 / p95 "
          "| worst client's median inter-token vs first row |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
              f"{pct(r['ttft'], 50):.2f} / {pct(r['ttft'], 95):.2f} s | "
              f"{pct(r['gaps'], 50) * 1e3:.0f} / {pct(r['gaps'], 95) * 1e3:.0f} ms | "
              f"{r['worst_client_itl'] / base['worst_client_itl']:.2f}x |")


def conversation_ttfts(client, model: str, turns: int, max_tokens: int) -> list[float]:
    """TTFT of turns 2..`turns` of one greedy conversation."""
    messages, ttfts = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        sample, reply = chat(client, model, messages, max_tokens, seed=None)
        messages.append({"role": "assistant", "content": reply})
        if turn:
            ttfts.append(sample.ttft)
    return ttfts


@user_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # MODEL, --demo, --config, --device, --cache-dir, --yes: named and prepared as offload-serve does (model_args.py)
    add_model_arguments(p, "serve the packaged demo model in-process",
                        config_default="as offload-serve: t4-16gb on CUDA, cpu otherwise")
    p.add_argument("--url", help="an already running server on this machine, e.g. http://127.0.0.1:8000 (instead "
                                 "of MODEL or --demo)")
    add_debug_flag(p)
    p.add_argument("--api-key", default="unused")
    p.add_argument("--clients", type=int, nargs="+", default=[4], help="client counts to run in turn (default 4)")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH,
                   help=f"requests generated at once by an in-process server (default {MAX_BATCH})")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per request (default 120)")
    p.add_argument("--compare-prefix-reuse", action="store_true")
    p.add_argument("--turns", type=int, default=8, help="conversation turns for --compare-prefix-reuse")
    p.add_argument("--repeats", type=int, default=3, help="conversations per setting for --compare-prefix-reuse")
    args = p.parse_args(argv)
    if sum([bool(args.model), args.demo, bool(args.url)]) != 1:
        p.error("give one of MODEL, --demo or --url")
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("--url must be a loopback address (127.0.0.1 / localhost): this script only loads this machine")
    if args.compare_prefix_reuse and args.url:
        p.error("--compare-prefix-reuse starts its own servers: give MODEL or --demo, not --url")

    import openai

    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    servers, engine = [], None
    if not args.url:
        from offload_engine.cli import load_engine
        from offload_engine.server import BackgroundServer, create_app

        engine = load_engine(resolve_setup(args), log=sys.stdout)
        for reuse in ([True, False] if args.compare_prefix_reuse else [True]):
            app = create_app(engine, model_name="m", max_queue=max(32, *args.clients), prefix_reuse=reuse,
                             max_batch=args.max_batch)
            servers.append((reuse, BackgroundServer(app).start()))
    else:
        print(f"server: {args.url} (dtype and config: see its start-up line)")
    print(f"load average {os.getloadavg()[0]:.2f}; " + (f"batching up to {args.max_batch} requests, dtype "
          f"{engine.config.dtype}" if engine else "batching and dtype: see the server's start-up line"))

    try:
        if args.compare_prefix_reuse:
            for reuse, server in servers:
                client = openai.OpenAI(base_url=server.url + "/v1", api_key=args.api_key, max_retries=0,
                                       timeout=args.timeout)
                ttfts = [t for _ in range(args.repeats) for t in conversation_ttfts(client, "m", args.turns,
                                                                                     args.max_tokens)]
                print(f"prefix reuse {'on ' if reuse else 'off'}: TTFT of turns 2..{args.turns} over {args.repeats} "
                      f"conversations: p50 {pct(ttfts, 50) * 1e3:.1f} ms, p95 {pct(ttfts, 95) * 1e3:.1f} ms")
            return 0
        url = args.url or servers[0][1].url
        client = openai.OpenAI(base_url=url + "/v1", api_key=args.api_key, max_retries=0, timeout=args.timeout)
        model = client.models.list().data[0].id
        rows = []
        for clients in args.clients:
            run, start = Run(), time.perf_counter()
            threads = [threading.Thread(target=client_loop, args=(client, model, args, i, start + args.duration, run),
                                        daemon=True) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(args.duration + args.timeout)
            row = report_load(run, time.perf_counter() - start, clients, args)
            rows += [row] if row else []
        if rows:
            print(f"load average after: {os.getloadavg()[0]:.2f}")
            table(rows)
        return 0
    finally:
        for _, server in servers:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
