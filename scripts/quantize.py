#!/usr/bin/env python
"""Quantize a Hugging Face Mixtral checkpoint once and write a pre-quantized checkpoint that loads fast.

    python scripts/quantize.py SRC DST [--config NAME_OR_PATH] [--device cpu|cuda] [--overwrite]

SRC: a local model directory or a hub repo id (e.g. mistralai/Mixtral-8x7B-Instruct-v0.1).
DST: the output directory; written under a temporary name and renamed only when complete.
--config: a packaged config (t4-16gb, 12gb, ...) or a YAML file; only `dtype` and `quant` shape the output,
its `offload` and `max_context` become the checkpoint's defaults (a caller of `load` may override them).
Then: `offload_engine.load(DST)`, or upload DST to the hub and `load("you/repo")`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from offload_engine import ConfigError, load_config, quantize_checkpoint  # noqa: E402
from offload_engine.checkpoint import CheckpointError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="Mixtral checkpoint directory or hub repo id")
    parser.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--config", default=None, help="packaged config name or YAML path (default: 4-bit attention, "
                        "2-bit experts, float16)")
    parser.add_argument("--device", default=None, help="where to quantize (default: cuda if available, else cpu); "
                        "load on the same kind of device for logits identical to quantizing at load time")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        start = time.perf_counter()
        dst = quantize_checkpoint(args.src, args.dst, cfg, progress=not args.quiet, device=args.device,
                                  overwrite=args.overwrite)
    except (ConfigError, CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in dst.iterdir())
    print(f"wrote {dst} ({size / 1e9:.3f} GB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
