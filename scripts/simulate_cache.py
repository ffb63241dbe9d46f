#!/usr/bin/env python
"""Replay expert-routing traces through per-layer expert caches and print a hit-rate table.

    python scripts/simulate_cache.py [TRACE ...] [--k 1-8] [--policies lru lfu lrfu belady] [--markdown]

TRACE: npz files in the shared format (``<set>_pN_experts`` arrays) or profiler JSON reports (``{"routing": ...}``:
record your own model's with ``python scripts/profile_cache.py MODEL --out report.json``); default, beside a
checkout: ../shared/data/routing/*.npz. Every problem starts with empty caches; rates are aggregated over all of them.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from offload_engine.errors import UsageError, add_debug_flag, user_errors  # noqa: E402
from offload_engine.policy import POLICIES  # noqa: E402
from offload_engine.simulate import BELADY, default_trace_paths, hit_rate_table, load_traces  # noqa: E402


def parse_ks(text: str) -> list[int]:
    """'1-8' -> 1..8, '2,4,6' -> [2, 4, 6], '4' -> [4]."""
    ks: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                ks.extend(range(lo, hi + 1))
            elif part:
                ks.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --k {text!r}: use e.g. 1-8, 4 or 2,4,6") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"bad --k {text!r}: need slot counts >= 1")
    return sorted(set(ks))


@user_errors
def main(argv: list[str] | None = None) -> int:
    valid = (*POLICIES, BELADY)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="*", metavar="TRACE", help="npz or profiler JSON (default: the shared npz files)")
    ap.add_argument("--k", type=parse_ks, default=list(range(1, 9)), help="experts per layer on the GPU (default 1-8)")
    ap.add_argument("--policies", nargs="+", default=list(valid), metavar="NAME",
                    help=f"policies to compare, from {', '.join(valid)} (default: all)")
    ap.add_argument("--no-prefetch", action="store_true", help="skip the oracle-prefetch rows")
    ap.add_argument("--prefetch-first-layer", action="store_true",
                    help="let the oracle prefetch layer 0 too (default: layer 0 cannot be prefetched)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    add_debug_flag(ap)
    args = ap.parse_args(argv)

    policies = [p.strip().lower() for item in args.policies for p in item.split(",") if p.strip()]
    bad = [p for p in policies if p not in valid]
    if bad:
        ap.error(f"unknown policy {', '.join(bad)}; valid names: {', '.join(valid)}")
    paths = [Path(p) for p in args.traces] or default_trace_paths()
    if not paths:
        raise UsageError("no TRACE given and no shared traces (../shared/data/routing/*.npz): record your model's "
                         "routing with `python scripts/profile_cache.py MODEL --out report.json` and pass report.json")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"trace file(s) not found: {', '.join(missing)}; give npz traces or profiler JSON reports "
                         f"(scripts/profile_cache.py --out)")
    for path in paths:  # numpy/json errors on a file of the wrong kind: name the file
        try:
            load_traces(path)
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise UsageError(f"cannot read trace {path} ({type(e).__name__}: {e}); each TRACE must be an npz in the "
                             f"shared format or a profiler JSON report") from e
    traces = load_traces(*paths)

    start = time.perf_counter()
    table = hit_rate_table(traces, policies, args.k, (False,) if args.no_prefetch else (False, True),
                           prefetch_first_layer=args.prefetch_first_layer)
    elapsed = time.perf_counter() - start

    argv_shown = sys.argv[1:] if argv is None else argv
    shapes = ", ".join(f"{name} {a.shape[0]}x{a.shape[1]}x{a.shape[2]}" for name, a in traces.items())
    lines = [
        "$ python scripts/simulate_cache.py " + " ".join(shlex.quote(a) for a in argv_shown),
        f"machine: {platform.platform()}, {platform.machine()}, Python {platform.python_version()}",
        f"traces: {', '.join(os.path.relpath(p) for p in paths)}",
        f"problems (tokens x layers x top_k): {shapes}; {table.tokens} tokens",
        "hit rate (%) per policy and experts per layer k; every layer starts empty"
        + ("" if args.no_prefetch else "; the oracle prefetch stages each layer's experts one layer ahead"
           + (" (all layers)" if args.prefetch_first_layer else " (layers 1+: layer 0 cannot be prefetched)")),
        f"simulated in {elapsed:.1f} s",
        "",
    ]
    if args.markdown:
        lines = [f"`{lines[0][2:]}`", ""] + [f"- {line}" for line in lines[1:-1]] + [""]
    print("\n".join(lines))
    print(table.format(markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
