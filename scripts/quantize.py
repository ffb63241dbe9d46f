#!/usr/bin/env python
"""Quantize a Hugging Face mixture-of-experts checkpoint (any family in the README's table) once and write a
pre-quantized checkpoint that loads fast.

    python scripts/quantize.py SRC DST [--config NAME_OR_PATH] [--device cpu|cuda|cuda:N] [--overwrite]
                               [--keep-source] [--revision REV] [--push-to-hub REPO [--private]] [--quiet] [--debug]
    python scripts/quantize.py --demo DST     # the demo model shipped in the package (the same as SRC `demo`)

SRC: a local model directory, `demo`, or a hub repo id (e.g. mistralai/Mixtral-8x7B-Instruct-v0.1). A hub repo is
downloaded one shard at a time; each shard is deleted once converted (peak disk: the output plus one shard, or
plus the two shards an MXFP4 matrix straddles; the plan printed first says how much) unless --keep-source, which
keeps them in the Hugging Face cache.
DST: the output directory; built in a hidden `.DST.partial-*` sibling and renamed only when complete. If the run
is interrupted (Ctrl-C, SIGTERM, a lost Colab runtime), run the same command again: it resumes, and nothing
already converted is downloaded or quantized again.
--config: a packaged config (t4-16gb, 12gb, ...) or a YAML file; only `dtype` and `quant` shape the output,
its `offload` and `max_context` become the checkpoint's defaults (a caller of `load` may override them).
Default: 4-bit attention, 2-bit experts, float16; for the demo its own set-up, as in offload-chat.
--push-to-hub REPO: upload DST with a generated model card (README.md) afterwards.
Then: `offload_engine.load(DST)`, or `load("you/repo")` after --push-to-hub.
Exit status: 0 done, 2 a user error (one `error: ...` line; --debug or OFFLOAD_ENGINE_DEBUG=1 shows the
traceback), 130 interrupted (the work so far is kept for the next run).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from offload_engine import load_config, quantize_checkpoint  # noqa: E402
from offload_engine.checkpoint import is_hub_id, resolve_model_dir  # noqa: E402
from offload_engine.convert.cache import converted_dir  # noqa: E402
from offload_engine.convert.push import push_to_hub  # noqa: E402
from offload_engine.errors import UsageError  # noqa: E402
from offload_engine.loader import demo_config, is_demo, resolve_device  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", nargs="?", help="checkpoint directory, `demo` or hub repo id (omit with --demo)")
    parser.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--demo", action="store_true", help="convert the demo model shipped in the package")
    parser.add_argument("--config", default=None, help="packaged config name or YAML path (default: 4-bit attention, "
                        "2-bit experts, float16; the demo's own set-up for the demo)")
    parser.add_argument("--device", default=None, help="where to quantize (default: cuda if "
                        "available, else cpu); load on the same kind of device for logits identical to quantizing "
                        "at load time")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--keep-source", action="store_true", help="keep the downloaded source shards (in the "
                        "Hugging Face cache) instead of deleting each once converted")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit of SRC (default: main)")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload DST to this hub repo with a "
                        "model card when done")
    parser.add_argument("--private", action="store_true", help="create the --push-to-hub repo as private")
    parser.add_argument("--quiet", action="store_true", help="no plan, no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise ValueError(f"--device {args.device}: not a device this can quantize on; use cpu, cuda or cuda:N")
    device = resolve_device(args.device)
    src = "demo" if args.demo else args.src
    config = args.config
    if is_hub_id(src):
        point_to_converted_copy_when_offline(src, config)
    elif config is None and is_demo(resolve_model_dir(src)):
        config = demo_config(device)
    start = time.perf_counter()
    dst = quantize_checkpoint(src, args.dst, config, progress=not args.quiet, device=device,
                              overwrite=args.overwrite, keep_source=args.keep_source, revision=args.revision)
    size = sum(p.stat().st_size for p in dst.iterdir())
    print(f"wrote {dst} ({size / 1e9:.3f} GB) in {time.perf_counter() - start:.1f} s")
    if args.push_to_hub:
        url = push_to_hub(dst, args.push_to_hub, source=src, private=args.private)
        print(f"uploaded to {url}")
    return 0


def point_to_converted_copy_when_offline(repo: str, config) -> None:
    """Offline, a hub source cannot be converted; when offload-chat converted it already, say where that copy is."""
    from huggingface_hub import constants

    converted = converted_dir(repo, load_config(config))
    if constants.HF_HUB_OFFLINE and converted.exists():
        raise UsageError(f"the hub is offline (HF_HUB_OFFLINE is set), so {repo} cannot be downloaded; a copy "
                         f"converted with these settings is already in {converted}: load or copy that, or unset "
                         f"HF_HUB_OFFLINE, with a network, to convert {repo} again")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo == (args.src is not None):
        parser.error("give SRC (a checkpoint directory or hub repo id) or --demo, not both" if args.demo
                     else "give SRC (a checkpoint directory or hub repo id) and DST, or --demo DST")
    try:
        return run(args)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line; the conversion keeps what it finished
        if args.debug or os.environ.get("OFFLOAD_ENGINE_DEBUG"):
            raise
        print(f"\ninterrupted: {e}" if str(e) else "\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, UsageError) as e:  # ConfigError, CheckpointError, QuantizationError: ValueErrors
        if args.debug or os.environ.get("OFFLOAD_ENGINE_DEBUG"):
            raise
        text = str(e)
        if isinstance(e, OSError) and e.filename:
            text = f"cannot write or read {e.filename}: {e.strerror}; check the path and its permissions"
        print(f"error: {' '.join(text.split())}", file=sys.stderr)  # one line, even for multi-line messages
        return 2


if __name__ == "__main__":
    sys.exit(main())
