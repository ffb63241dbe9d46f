"""How every command names the model it loads, and prepares it: offload-chat, offload-serve and
scripts/profile_cache.py take the same arguments (`add_model_arguments`) and resolve them the same way
(`resolve_setup`).

    MODEL        a local directory (a Hugging Face checkpoint, or one converted by scripts/quantize.py), `demo`,
                 or a hub repo id; --demo is MODEL `demo`
    --config     a packaged config name or a YAML path; without it: the command's default, the demo's own set-up
                 for the demo (loader.demo_config), a converted checkpoint's own
    --device     cpu, cuda or cuda:N
    --cache-dir  where a hub source repo is converted once (convert/cache.py); --yes converts without asking
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import MANIFEST, is_hub_id, read_config, resolve_model_dir
from .config import ConfigLike, load_config
from .convert.cache import ask_before_download, prepare_model
from .loader import demo_config, is_demo, resolve_device


def parse_device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    return text


def command_default_config(device: torch.device) -> str:
    """offload-chat's and offload-serve's config when --config is not given (and the model is neither the demo
    nor pre-quantized)."""
    return "t4-16gb" if device.type == "cuda" else "cpu"


def add_model_arguments(p: argparse.ArgumentParser, demo_help: str,
                        config_default: str = "t4-16gb on CUDA, cpu otherwise") -> None:
    """MODEL, --demo, --config, --device, --cache-dir, --yes: how a command names what to load, and where."""
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="local model directory (Hugging Face or converted), `demo`, or a Hugging Face repo id "
                        "(omit with --demo)")
    p.add_argument("--demo", action="store_true", help=demo_help + " (the same as MODEL `demo`)")
    p.add_argument("--config", metavar="NAME_OR_PATH",
                   help="packaged config name (t4-16gb, 12gb, 8gb, 24gb, cpu) or a YAML path; default: "
                        f"{config_default}; the demo's own set-up for the demo (cpu with 4 of 8 experts per layer "
                        "offloaded, prefetch 1); a converted checkpoint's own (of which --config may change only "
                        "offload.*, max_context, max_batch and kernels)")
    p.add_argument("--device", type=parse_device, metavar="DEVICE",
                   help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--cache-dir", metavar="DIR", help="where a hub source repo is converted once (default: "
                   "$HF_HUB_CACHE/offload_engine); later runs load the converted copy directly")
    p.add_argument("--yes", action="store_true", help="convert a hub source repo without asking, however large")


def parse_model_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; exactly one of MODEL and --demo must be given."""
    args = parser.parse_args(argv)
    if args.demo == (args.model is not None):
        parser.error("give a MODEL (a checkpoint directory or hub repo id) or --demo, not both"
                     if args.demo else "give a MODEL (a checkpoint directory or hub repo id), or --demo")
    return args


@dataclass
class Setup:
    model_dir: Path
    config: ConfigLike  # for load(): a packaged name, YAML path or dict; None: a pre-quantized checkpoint's own
    device: torch.device
    window: int | None  # the context window, when it is known before loading


def resolve_setup(args: argparse.Namespace,
                  default_config: Callable[[torch.device], ConfigLike] = command_default_config) -> Setup:
    """The model directory, config and device that the arguments of `add_model_arguments` name, checked before
    anything heavy is loaded: a hub source repo is converted into the cache first (once: streamed, resumable)."""
    device = resolve_device(args.device)
    model = "demo" if args.demo else args.model
    config = args.config if args.config is not None else default_config(device)
    if is_hub_id(model):
        model = prepare_model(model, config, device, args.cache_dir, ask_before_download(args.yes))
    model_dir = resolve_model_dir(model)
    if (model_dir / MANIFEST).exists():  # pre-quantized: the engine merges --config (offload.*) into its own
        if args.config is not None:
            load_config(args.config)  # an unknown name or a broken file fails now
        return Setup(model_dir, args.config, device, None)
    if args.config is None and is_demo(model_dir):
        config = demo_config(device)
    window = min(load_config(config).max_context, read_config(model_dir).max_position_embeddings)
    return Setup(model_dir, config, device, window)
