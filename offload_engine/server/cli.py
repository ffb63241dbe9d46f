"""`offload-serve`: serve a checkpoint over OpenAI's HTTP API.

    offload-serve MODEL [--config NAME_OR_PATH] [--device cpu|cuda|cuda:N] [--cache-dir DIR] [--yes]
                  [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch N] [--max-queue N]
                  [--served-model-name NAME] [--no-prefix-reuse]
    offload-serve --demo            # the small demo model shipped in the package (same as MODEL `demo`)

MODEL is named and prepared as for offload-chat (offload_engine/model_args.py: a directory, `demo`, or a hub repo
id, converted once into the cache). --port 0 picks a free port (uvicorn's log line says which).

Ctrl-C / SIGTERM shut it down: running requests get 5 s to finish, then their generation is stopped (uvicorn
then re-raises the signal, so the exit status is the signal's). Exit code 2 with a one-line `error: ...` for a
bad model, config or option.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from ..cli import UsageError, cli_terms, load_engine
from ..model_args import add_model_arguments, parse_model_args, resolve_setup
from ..config import explicit_keys
from ..memory import MAX_BATCH, NotEnoughMemory, resolve_max_batch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="offload-serve", description="Serve a mixture-of-experts checkpoint whose experts are offloaded to host "
                                          "memory over an OpenAI-compatible HTTP API (/v1/chat/completions, ...).",
        epilog="Up to --max-batch requests are generated together (continuous batching: a request joins at the "
               "next step and leaves when it ends); others wait in a FIFO queue. GET /metrics gives Prometheus "
               "metrics, GET /health a liveness check.")
    add_model_arguments(p, "serve the small demo model shipped in the package")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("OFFLOAD_SERVE_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $OFFLOAD_SERVE_API_KEY; none)")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help=f"requests generated together, each with its own KV cache at max_context; on a GPU, "
                        f"experts_on_device: auto leaves room for them (default: the config's max_batch when above "
                        f"1, else up to {MAX_BATCH}, as many as fit the memory left after loading)")
    p.add_argument("--max-queue", type=int, default=32, metavar="N",
                   help="requests that may wait while --max-batch are generated; more get HTTP 429 (default 32)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model id in /v1/models and responses (default: the MODEL argument, or 'demo')")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="always prefill the whole prompt (default: reuse the previous request's KV cache when the "
                        "new prompt extends it, as the next turn of a conversation does)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_model_args(build_parser(), argv)
    try:
        from . import require_extra

        require_extra()
        if args.max_queue < 0:
            raise UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
        if args.max_batch is not None and args.max_batch < 1:
            raise UsageError(f"--max-batch must be >= 1, got {args.max_batch}")
        if not 0 <= args.port <= 65535:
            raise UsageError(f"--port must be in 0..65535, got {args.port}")
        setup = resolve_setup(args)
        if args.max_batch is not None:  # `experts_on_device: auto` leaves room for this many KV caches
            setup = dataclasses.replace(setup, config={**explicit_keys(setup.config), "max_batch": args.max_batch})
        engine = load_engine(setup)
        max_batch, why = resolve_max_batch(engine.model.config, engine.config, engine.device, args.max_batch)
        print(f"batching: {why}", file=sys.stderr)
        from .runner import serve

        if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
            print(f"warning: binding {args.host} without --api-key: anyone who can reach it can use the model",
                  file=sys.stderr)
        name = args.served_model_name or ("demo" if args.demo else args.model)
        serve(engine, args.host, args.port, model_name=name, api_key=args.api_key, max_queue=args.max_queue,
              prefix_reuse=not args.no_prefix_reuse, max_batch=max_batch)
        return 0
    except (UsageError, ValueError, NotEnoughMemory, OSError, ImportError) as e:
        print(f"error: {cli_terms(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
