"""`offload-chat`: chat with an offloaded mixture-of-experts checkpoint (Mixtral, Qwen3-MoE, ...) in the terminal,
or answer one prompt for scripts.

    offload-chat MODEL [--config NAME_OR_PATH] [--device cpu|cuda|cuda:N] [--cache-dir DIR] [--yes]
                 [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--repetition-penalty R] [--seed S]
                 [--system TEXT] [--prompt TEXT] [--no-stats]
    offload-chat --demo            # the small demo model shipped in the package (same as MODEL `demo`)

MODEL is named as for offload-serve and scripts/profile_cache.py (model_args.py): a local directory (a Hugging
Face checkpoint, or one converted by scripts/quantize.py), `demo` (or --demo, or the packaged demo directory: one
set-up, loader.demo_config), or a hub repo id. A hub repo that holds a full-precision model is converted once,
shard by shard, into a cache directory (the plan is shown first, and a large download asks for a y unless --yes),
then loaded; later runs load it directly, offline too.

Where output goes: stdout carries the conversation (the `>>> ` prompt, the streamed replies, and what /stats
and /help print), so `offload-chat MODEL --prompt "..." > answer.txt` captures the answer alone. stderr carries
everything about the run: loading progress and the one-line model summary, notices (e.g. old turns dropped),
errors, and after each reply one stats line (unless --no-stats):

    [12 tokens in 3.5 s, 3.4 tok/s, expert cache hit rate 61.2% (this reply), prefetch precision 48.0% (12 of 25
     guesses used)]

  * tokens: the tokens generated for the reply (ChatSession.last_reply_ids; EOS not counted).
  * tok/s: tokens / wall time from sending the message to the end of the reply (prefill of the turn included).
  * hit rate: expert-cache hits / lookups during this reply (the turn's prefill and the decode steps). When every
    expert is resident (e.g. the cpu config) the clause reads "all experts on device" instead: 100% by construction.
  * prefetch precision: of the experts that speculation named (guesses), the share the layer then really used
    (this reply), with its parts; "prefetch off" when the config disables prefetch or every expert is resident.
    The rates are defined once, in cache_stats.py (also for /stats, the server's /metrics and profile_cache.py).
An interrupted reply prints `(stopped ...)` on stderr before its stats line.

Exit codes: 0 on /exit, EOF (Ctrl-D) or Ctrl-C twice in a row at the prompt (one press only asks, so a Ctrl-C
meant for a reply that had just ended loses nothing); 2 with a one-line `error: ...` on stderr for a bad model,
config or option (`--debug` or OFFLOAD_ENGINE_DEBUG=1 shows the traceback); 130 when Ctrl-C interrupts loading
or a --prompt answer.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from typing import TextIO

from .cache_stats import counters, difference, hit_rate, precision_text, recall_text
from .chat import ChatSession
from .config import QuantSpec
from .engine import Engine
from .errors import UsageError, add_debug_flag, debug_requested, one_line, run_guarded
from .generate import SamplingParams
from .loader import load
from .model_args import Setup, add_model_arguments, parse_model_args, resolve_setup

PROMPT = ">>> "
DEFAULT_MAX_NEW_TOKENS = 512
HELP = """commands:
  /reset   forget the conversation (the system prompt stays)
  /stats   expert-cache statistics since the model was loaded: overall and hit rate per layer
  /help    this list
  /exit    quit (or Ctrl-D); Ctrl-C stops a reply while it is being written, Ctrl-C twice at the prompt quits"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="offload-chat", description="Chat with a mixture-of-experts checkpoint (any family in the README's table) "
                                           "whose experts are offloaded to host memory.",
        epilog="Replies stream to stdout; loading progress, notices and the per-reply stats line go to stderr. "
               "In the chat, /help lists the commands.")
    add_model_arguments(p, "use the small demo model shipped in the package")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"longest reply in tokens (default {DEFAULT_MAX_NEW_TOKENS}, at most half the context window)")
    p.add_argument("--temperature", type=float, default=0.7, metavar="T", help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling threshold (default 0.9)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the k most likely tokens; 0 = off (default)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="> 1 discourages repeats (default 1.0)")
    p.add_argument("--seed", type=int, metavar="S", help="fixes sampling; each reply is then reproducible")
    p.add_argument("--system", metavar="TEXT", help="system prompt (where the chat template has no system role, as "
                   "Mixtral's, it is prepended to the first user message)")
    p.add_argument("--prompt", metavar="TEXT",
                   help="answer this one message, print the stats line and exit (for scripts)")
    p.add_argument("--no-stats", action="store_true", help="no stats line after replies")
    add_debug_flag(p)
    return p


def sampling_options(args: argparse.Namespace, max_new_tokens: int) -> dict:
    options = {"max_new_tokens": max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "seed": args.seed}
    SamplingParams.from_kwargs(**options)  # validate before the (slow) load, not at the first message
    return options


def cli_terms(error: Exception) -> str:
    """An API error message in the words of this command line (its option names)."""
    text = one_line(error)
    for name in ("max_new_tokens", "top_p", "top_k", "repetition_penalty", "temperature", "seed"):
        text = re.sub(rf"\b{name}\b=?", "--" + name.replace("_", "-") + " ", text).replace("  ", " ")
    return text


def fit_max_new_tokens(requested: int | None, window: int) -> tuple[int, str | None]:
    """The reply budget for a `window`-token context, and a note when the default had to shrink.

    A default that would leave no room for the conversation is halved silently-but-noted (the demo model has a
    512-token window); an explicit value that leaves no room is an error."""
    if requested is None:
        if DEFAULT_MAX_NEW_TOKENS <= window // 2:
            return DEFAULT_MAX_NEW_TOKENS, None
        fitted = max(1, window // 2)
        return fitted, f"note: replies limited to {fitted} tokens, half of the {window}-token context window"
    if requested >= window:
        raise UsageError(f"--max-new-tokens {requested} leaves no room for a message in the {window}-token context "
                         f"window; use at most {window // 2} or so")
    return requested, None


def load_engine(setup: Setup, log: TextIO | None = None) -> Engine:
    """Load and warm up the model of `setup`, with progress and the one-line summary on `log` (stderr)."""
    log = log or sys.stderr
    print(f"loading {setup.model_dir} on {setup.device} ...", file=log, flush=True)
    start = time.perf_counter()
    engine = load(setup.model_dir, setup.config, setup.device, progress=True)
    warm_up(engine)
    print(summary_line(engine, time.perf_counter() - start), file=log, flush=True)
    return engine


def warm_up(engine: Engine) -> None:
    """A throwaway prefill + decode step: the first ones pay for lazy kernel/thread-pool/allocator set-up (seconds
    on CPU), which would otherwise show up as a misleadingly slow first reply. Its cache counters are cleared."""
    token = getattr(engine.tokenizer, "bos_token_id", None) or 0
    engine.generate_ids([token] * 4, max_new_tokens=2)
    engine.reset_stats()


def quant_text(spec: QuantSpec, dtype: str) -> str:
    return f"{spec.bits}-bit" if spec.bits is not None else dtype  # unquantized: stored in the model dtype


def summary_line(engine: Engine, seconds: float) -> str:
    cfg, cache, stats = engine.config, engine.cache, engine.stats()
    prefetch = f"prefetch {cache.prefetch_count}/layer" if cache.prefetch_count else "prefetch off"
    if cache.prefetch_count and stats["prefetch_min_precision"] > 0:
        prefetch += f" (gate: precision >= {stats['prefetch_min_precision']:g})"
    k = stats["experts_on_device"]
    offloaded = 0 < k < cache.num_experts
    return (f"loaded {engine.model_dir} in {seconds:.1f} s: {engine.device}, {cfg.dtype}; attention "
            f"{quant_text(cfg.quant.attention, cfg.dtype)}, experts {quant_text(cfg.quant.experts, cfg.dtype)}; "
            f"{k}/{cache.num_experts} experts/layer on device ({size_text(cache.device_bytes())}), {prefetch}"
            + (f", write-back {stats['write_back']}" if offloaded else "")
            + (f"; the experts of the first {stats['cpu_layers']} MoE layers on the CPU (cpu_layers)"
               if stats["cpu_layers"] else "")
            + f"; cpu_compute {stats['cpu_compute']}; context {engine.context_window}; kernels {engine.kernels.name}"
            + (f" (compiled in {engine.kernel_warmup_s:.1f} s)" if engine.kernel_warmup_s >= 0.1 else ""))


def size_text(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def reply_stats(engine: Engine, before: dict, after: dict, tokens: int, seconds: float) -> str:
    """The per-reply line; `before`/`after` are engine.stats()["overall"] around the reply."""
    delta = difference(after, before)
    all_resident = engine.cache.k >= engine.cache.num_experts and not engine.model.cpu_layers
    hit = ("all experts on device" if all_resident
           else f"expert cache hit rate {hit_rate(delta).percent()} (this reply)")
    prefetch = "prefetch off" if not engine.cache.prefetch_count else precision_text(delta)
    rate = tokens / seconds if seconds > 0 else 0.0
    return f"[{tokens} tokens in {seconds:.1f} s, {rate:.1f} tok/s, {hit}, {prefetch}]"


def stats_report(engine: Engine) -> str:
    """What /stats prints: the counters since loading, then the hit rate of every layer, 8 layers a row."""
    stats = engine.stats()
    o, overall = stats["overall"], counters(stats["overall"])
    lines = [
        (f"expert cache since loading: {o['lookups']} lookups, hit rate {hit_rate(overall).percent()}, "
         f"{o['misses']} misses, {o['evictions']} evictions"),
        (f"  {stats['experts_on_device']}/{engine.cache.num_experts} experts/layer on device "
         f"({size_text(stats['device_bytes'])}), {size_text(stats['host_bytes'])} on host"),
        (f"  copied {size_text(o['bytes_h2d'])} host->device, {size_text(o['bytes_d2h'])} device->host; "
         f"waited {o['wait_s']:.2f} s for copies; {stats['host_syncs']} host syncs"),
    ]
    if stats["cpu_compute_active"]:
        lines.append(f"  computed on the CPU: {o['cpu_computed']} missed experts in {o['cpu_ms'] / 1000:.2f} s "
                     f"(cpu_compute {stats['cpu_compute']})")
    if stats["prefetch"]:
        lines.append(f"  {precision_text(overall)}, {recall_text(overall)}")
        lines.append(f"  prefetch {stats['prefetch']}/layer: {o['prefetch_issued']} experts copied ahead of need, "
                     f"{o['prefetch_used']} of them used, {o['prefetch_wasted']} wasted (a guess of an expert "
                     f"already on the device copies nothing)")
    else:
        lines.append("  prefetch off")
    per_layer = stats["per_layer"]
    lines.append("hit rate by layer:")
    for start in range(0, len(per_layer), 8):
        rates = [hit_rate(counters(s)).percent().rjust(6) for s in per_layer[start:start + 8]]
        end = min(start + 8, len(per_layer)) - 1
        lines.append(f"  {f'{start}-{end}':>7}: " + " ".join(rates))
    return "\n".join(lines)


class Chat:
    """One conversation on the terminal: streams replies to `out`, stats/notices/errors to `err`."""

    def __init__(self, engine: Engine, session: ChatSession, sampling: dict, show_stats: bool,
                 out: TextIO, err: TextIO):
        self.engine, self.session, self.sampling, self.show_stats = engine, session, sampling, show_stats
        self.out, self.err = out, err

    def reply(self, message: str) -> bool:
        """Stream the answer to `message`; True when Ctrl-C stopped it. A message the model cannot take (too
        long for the context window) raises ValueError with nothing changed."""
        before, notices = self.engine.stats()["overall"], len(self.session.notices)
        start = time.perf_counter()
        text, shown, interrupted = "", False, False
        # The session also reports notices as warnings (file:line noise); print them once, plainly, below.
        with warnings.catch_warnings(record=True) as caught:
            stream = self.session.stream(message, **self.sampling)
            try:
                for piece in stream:
                    text += piece
                    if not shown:  # the model's leading space/newline after [/INST] only misaligns the display
                        piece = piece.lstrip()
                        shown = bool(piece)
                    self.out.write(piece)
                    self.out.flush()
            except KeyboardInterrupt:
                interrupted = True
            finally:
                # Closing runs the session's cleanup now: the partial reply is kept and the KV cache matches it.
                stream.close()
        seconds = time.perf_counter() - start
        self.out.write("\n")
        self.out.flush()
        new_notices = self.session.notices[notices:]
        for notice in new_notices:
            print(f"note: {notice}", file=self.err)
        for w in caught:
            if str(w.message) not in new_notices:
                print(f"warning: {w.message}", file=self.err)
        if interrupted:
            print("(stopped by Ctrl-C; the partial reply stays in the conversation, /reset forgets it)", file=self.err)
        if self.show_stats:
            tokens = len(self.session.last_reply_ids)
            print(reply_stats(self.engine, before, self.engine.stats()["overall"], tokens, seconds), file=self.err)
        self.err.flush()
        return interrupted

    def command(self, line: str) -> bool:
        """Run a /command; False when it asks to quit."""
        name = line.split()[0].lower()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.session.reset()
            print("(conversation cleared)", file=self.out)
        elif name == "/stats":
            print(stats_report(self.engine), file=self.out)
        elif name in ("/help", "/?"):
            print(HELP, file=self.out)
        else:
            print(f"unknown command {name}; /help lists the commands", file=self.err)
        self.out.flush()
        return True

    def loop(self) -> int:
        """Read messages until /exit, EOF or two Ctrl-C in a row at the prompt."""
        if sys.stdin.isatty():
            try:
                import readline  # noqa: F401  (line editing and history for input(); absent on Windows)
            except ImportError:
                pass
            print("type a message, /help for commands, /exit or Ctrl-D to quit", file=self.err)
        armed = False  # a Ctrl-C at the prompt was just pressed: the next one quits
        while True:
            try:
                line = input(PROMPT).strip()
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                # Often meant for a reply that had just ended: one press never throws the conversation away.
                self.out.write("\n")
                self.out.flush()
                if armed:
                    return 0
                armed = True
                print("(press Ctrl-C again to quit, or type /exit; the conversation is kept)", file=self.err)
                continue
            armed = False
            try:
                if not line:
                    continue
                if line.startswith("/"):
                    if not self.command(line):
                        return 0
                    continue
                self.reply(line)
            except ValueError as e:  # e.g. a message longer than the context window: say so, keep chatting
                print(f"error: {cli_terms(e)}", file=self.err)
            except KeyboardInterrupt:  # after the reply's stream ended (e.g. while its stats were printed)
                self.out.write("\n")
                print("(interrupted; the conversation is kept)", file=self.err)


def run(args: argparse.Namespace) -> int:
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty: give the message to answer")
    setup = resolve_setup(args)
    requested_max = args.max_new_tokens
    early_max = DEFAULT_MAX_NEW_TOKENS if requested_max is None else requested_max
    if setup.window is not None:  # check the reply budget now rather than after minutes of loading
        early_max, _ = fit_max_new_tokens(requested_max, setup.window)
    sampling_options(args, early_max)
    engine = load_engine(setup)
    max_new_tokens, note = fit_max_new_tokens(requested_max, engine.context_window)
    if note:
        print(note, file=sys.stderr)
    session = engine.chat(system=args.system)
    chat = Chat(engine, session, sampling_options(args, max_new_tokens), not args.no_stats, sys.stdout, sys.stderr)
    if args.prompt is None:
        return chat.loop()
    return 130 if chat.reply(args.prompt) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_model_args(build_parser(), argv)
    if hasattr(sys.stdout, "reconfigure"):  # a reply's non-ASCII text must not crash a non-UTF-8 console
        sys.stdout.reconfigure(errors="replace")
    def guarded() -> int:
        try:
            return run(args)
        except BrokenPipeError:  # e.g. `offload-chat ... --prompt x | head -c 100`: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1

    # ConfigError and CheckpointError are ValueErrors whose messages already say what to do.
    return run_guarded(guarded, args.debug or debug_requested([]), describe=cli_terms)


if __name__ == "__main__":
    sys.exit(main())
