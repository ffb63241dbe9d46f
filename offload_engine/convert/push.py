"""Share a pre-quantized checkpoint on the hub: a generated model card, then huggingface_hub's own upload calls."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..anatomy import Anatomy
from ..checkpoint import MANIFEST, read_config
from ..prequantized import _describe_quant, _read_manifest, resolve_config, validate

CARD = "README.md"


def model_card(folder: str | os.PathLike, repo_id: str, source: str | None = None) -> str:
    """The README.md for `folder` on the hub: source model, quantization, sizes, and how to load it."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    cfg = resolve_config(manifest, None, folder)
    model = manifest["model"]
    sizes = {name: entry["nbytes"] for name, entry in manifest["files"].items()}
    trunk = sizes.get("trunk.safetensors", 0)
    experts = sum(n for name, n in sizes.items() if name.startswith("layer-"))
    total = sum(sizes.values())
    base = f"base_model: {source}\n" if source and "/" in source and not Path(source).exists() else ""
    source_text = f"[{source}](https://huggingface.co/{source})" if base else (source or "not recorded")
    offload = cfg.offload
    num_experts = Anatomy.of(read_config(folder)).num_experts  # each family names it differently in its config
    return f"""---
{base}library_name: offload_engine
tags:
- {manifest.get('family', 'mixtral')}
- mixture-of-experts
- hqq
- offload_engine
---

# {repo_id.split('/')[-1]}

A pre-quantized checkpoint of {source_text} for
offload_engine, which runs mixture-of-experts models (Mixtral, Qwen3-MoE, DeepSeek-V2, GPT-OSS, ...) on one small GPU by
keeping part of each layer's experts on the GPU and the rest in host memory.

## Quantization

- {_describe_quant(cfg)}, quantized with HQQ
- model: {model['num_hidden_layers']} layers, {num_experts} experts per MoE layer, hidden size
  {model['hidden_size']}, vocabulary {model['vocab_size']}
- written by {manifest.get('created_by', 'offload_engine')}, format version {manifest['format_version']}
- default offload settings: {offload.experts_on_device} experts per layer on the GPU, prefetch {offload.prefetch},
  policy {offload.policy}; context {cfg.max_context} tokens (a caller may change these, not the quantization)

## Sizes

| part | bytes | GB |
|---|---:|---:|
| trunk (embeddings, final norm, lm_head) | {trunk} | {trunk / 1e9:.3f} |
| layers (attention, norms, routers, experts) | {experts} | {experts / 1e9:.3f} |
| total | {total} | {total / 1e9:.3f} |

Every file's size and every tensor's CRC-32 are listed in `{MANIFEST}`; loading checks them.

## How to load

```bash
pip install -e .   # from a clone of the offload_engine repository
offload-chat {repo_id} --config t4-16gb
```

```python
import offload_engine

engine = offload_engine.load("{repo_id}", config={{"offload": {{"experts_on_device": {offload.experts_on_device}}}}})
print(engine.generate("[INST] Hello! [/INST]", max_new_tokens=64))
```
"""


def upload_files(folder: Path) -> list[str]:
    """What goes to the hub: the files the manifest names, the manifest, and the model card."""
    manifest = json.loads((folder / MANIFEST).read_text())
    return [*manifest["files"], *manifest.get("aux_files", []), MANIFEST, CARD]


def push_to_hub(folder: str | os.PathLike, repo_id: str, source: str | None = None, private: bool = False,
                token: str | None = None, commit_message: str | None = None) -> str:
    """Check `folder` (a pre-quantized checkpoint) as a load would, write its model card (README.md) into it,
    create `repo_id` if needed and upload the checkpoint in one commit. Returns the repo URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    manifest = _read_manifest(folder)
    cfg = resolve_config(manifest, None, folder)
    validate(folder, manifest, read_config(folder), cfg)  # sizes and headers: never publish a damaged checkpoint
    (folder / CARD).write_text(model_card(folder, repo_id, source))
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    message = commit_message or f"offload_engine checkpoint ({_describe_quant(cfg)})"
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=upload_files(folder),
                      repo_type="model", commit_message=message)
    return str(url)
