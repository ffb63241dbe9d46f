"""Convert-once cache for `offload-chat HUB_ID`: a source repo is converted (streamed, resumable) into a cache
directory the first time and loaded from there afterwards; a pre-quantized repo is downloaded as it is.

Layout: `{cache}/{org}--{name}/{dtype}-a{bits}g{group}-e{bits}g{group}-{hash}` where `cache` is `--cache-dir` or
`{HF_HUB_CACHE}/offload_engine`, and the hash covers every quantization setting, so two configs never share a
directory. The source revision is not part of the name: once converted, later runs load without the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import MANIFEST, CheckpointError, is_hub_id, resolve_model_dir
from ..config import ConfigError, ConfigLike, EngineConfig, load_config
from .run import ConversionInterrupted, ConversionPlan, quantize_checkpoint

ASK_ABOVE_BYTES = 1e9  # downloads at least this large need a yes (--yes or the prompt)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / "offload_engine"


def converted_dir(repo: str, cfg: EngineConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    a, e = cfg.quant.attention, cfg.quant.experts
    digest = hashlib.sha256(json.dumps({"dtype": cfg.dtype, "quant": cfg.to_dict()["quant"]},
                                       sort_keys=True).encode()).hexdigest()[:8]
    tag = f"{cfg.dtype}-a{a.bits}g{a.group_size}-e{e.bits}g{e.group_size}-{digest}"
    return cache_root(cache_dir) / repo.replace("/", "--") / tag


def _is_prequantized_repo(repo: str) -> bool | None:
    """True/False from the hub's file list; None when the hub cannot be asked (offline, no network)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        files = HfApi().model_info(repo).siblings or []
    except OfflineModeIsEnabled:
        return None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"could not reach {repo!r} on the Hugging Face hub ({type(e).__name__}: {e}); check "
                              f"the repo id, your network, and `huggingface-cli login` for gated repos") from e
    return any(s.rfilename == MANIFEST for s in files)


def prepare_model(model: str | os.PathLike, config: ConfigLike, device: torch.device | None = None,
                  cache_dir: str | os.PathLike | None = None,
                  confirm: Callable[[ConversionPlan], bool] | None = None, progress: bool = True) -> str | Path:
    """What to load for `model`: a hub source repo converted into the cache (once), or `model` unchanged (a local
    directory, `demo`, a pre-quantized hub repo, or, offline, whatever the hub cache holds)."""
    if not is_hub_id(model):
        return model
    cfg = load_config(config)
    target = converted_dir(str(model), cfg, cache_dir)
    if (target / MANIFEST).exists():
        return target
    prequantized = _is_prequantized_repo(str(model))
    if prequantized is None:  # offline: only what is on disk already
        try:
            return resolve_model_dir(model)
        except CheckpointError as e:
            from huggingface_hub import constants

            raise CheckpointError(
                f"{model} is not on this machine and the hub is offline (HF_HUB_OFFLINE is set): no copy converted "
                f"with these settings in {target}, no download in {constants.HF_HUB_CACHE}; unset HF_HUB_OFFLINE, "
                f"with a network, to download and convert it once, or pass a local directory") from e
    if prequantized:
        return model
    try:
        return quantize_checkpoint(str(model), target, cfg, progress=progress, device=device, confirm=confirm)
    except ConversionInterrupted as e:  # say how to resume before the caller reports the interrupt
        print(f"\n{e}", file=sys.stderr, flush=True)
        raise


def ask_before_download(yes: bool, ask: Callable[[str], str] = input,
                        interactive: Callable[[], bool] = lambda: os.isatty(0)) -> Callable[[ConversionPlan], bool]:
    """A `confirm` for quantize_checkpoint: large downloads need --yes, or a y at the prompt on a terminal."""
    def confirm(plan: ConversionPlan) -> bool:
        if yes or plan.download_bytes < ASK_ABOVE_BYTES:
            return True
        if not interactive():
            raise ConfigError(f"converting {plan.source} downloads {plan.download_bytes / 1e9:.1f} GB; pass --yes to "
                              f"allow it when there is no terminal to ask on")
        return ask("download and convert it now? [y/N] ").strip().lower() in ("y", "yes")

    return confirm
