"""Reading Hugging Face MoE checkpoints (the families in families.py) tensor by tensor, with clear errors.

Nothing here instantiates the full-precision model: tensors are read lazily from the safetensors files one
at a time (`safe_open`), quantized by the caller, and dropped, so host RAM stays near the quantized size.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Container

import torch
from safetensors import safe_open

from .families import UnsupportedModel, config_problems, family_of, family_of_architectures


class CheckpointError(ValueError):
    """A model directory or hub repo that cannot be loaded; the message names the file and what to do."""


MANIFEST = "offload_manifest.json"  # marks a pre-quantized checkpoint (see prequantized.py)
PACKED_EXPERT = re.compile(r"model\.layers\.\d+\.experts\.\d+")  # a pre-quantized file's packed expert tensor
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


DEMO_DIR = Path(__file__).resolve().parent / "demo"  # the small model shipped in the package


def is_hub_id(model: str | os.PathLike) -> bool:
    """True for 'org/name' that is not an existing local path nor "demo": a Hugging Face hub repo id."""
    name = str(model)
    return (not Path(name).expanduser().exists() and name != "demo" and name.count("/") == 1
            and not name.startswith((".", "/", "~")))


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local directory as is; "demo" for the packaged demo model; a hub repo id downloaded (with progress) into
    the hub cache, or found there when offline."""
    path = Path(model).expanduser()
    if str(model) == "demo" and not path.exists():
        if not (DEMO_DIR / "config.json").exists():
            raise CheckpointError(f"the demo model is not installed (expected in {DEMO_DIR}); train it with "
                                  f"`python scripts/train_demo_model.py`, or pass a model directory")
        return DEMO_DIR
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and *.safetensors")
        return path
    name = str(model)
    if not is_hub_id(name):
        raise CheckpointError(f"model path {name!r} does not exist (and is not a hub repo id like 'org/name')")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=DOWNLOAD_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(
                f"{name!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub is offline "
                f"(HF_HUB_OFFLINE is set): unset HF_HUB_OFFLINE, with a network, to download it once, or pass a "
                f"local directory") from e
        raise CheckpointError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}: {e}); check the repo id, "
            f"your network, and `huggingface-cli login` for gated repos, or pass a local directory"
        ) from e


def read_config(model_dir: Path):
    """config.json as its family's transformers config class, checked."""
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{model_dir} has no config.json: it is not a Hugging Face model directory")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
    try:
        family = family_of(raw.get("model_type"))
    except UnsupportedModel as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    problems = config_problems(raw, family)
    named = family_of_architectures(raw)
    if named is not None and named is not family:
        problems.append(f"its architectures name {named.hf_class}, a {named.name} model (model_type "
                        f"{named.model_type!r})")
    if problems:  # e.g. another family's config relabelled: the config class would fill in defaults that do not fit
        raise CheckpointError(f"{config_path} says model_type {family.model_type!r} ({family.name}), but "
                              f"{'; '.join(problems)}: fix model_type, or use the config.json that came with the "
                              f"weights")
    try:
        config = family.config_class().from_dict(raw)
    except Exception as e:  # transformers' own field validation (huggingface_hub's strict dataclasses, ValueError)
        message = " ".join(str(e).split())
        raise CheckpointError(f"{config_path} has an invalid field: {message}; fix config.json or re-download it") from e
    if family.activation == "swiglu" and getattr(config, "hidden_act", "silu") != "silu":
        raise CheckpointError(f"{config_path}: hidden_act {config.hidden_act!r} is not the 'silu' of "
                              f"{family.name}'s SwiGLU experts")
    check_model_config(config, config_path)
    return config


EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")  # the families' names for it


def check_model_config(config, config_path: Path) -> None:
    """config.json's own cross-field rules, so that a bad edit fails here, naming the field, not in a forward."""
    count = next((key for key in EXPERT_COUNTS if getattr(config, key, None) is not None), "num_local_experts")
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", count, "num_experts_per_tok",
             "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings")
    for key in sizes:
        value = getattr(config, key, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{config_path}: {key} must be a positive integer, got {value!r}")
    E, K = getattr(config, count), config.num_experts_per_tok
    if K > E:
        raise CheckpointError(f"{config_path}: num_experts_per_tok ({K}) exceeds {count} ({E})")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % kv_heads:
        raise CheckpointError(f"{config_path}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                              f"({kv_heads})")
    if getattr(config, "head_dim", None) is None and config.hidden_size % heads:
        raise CheckpointError(f"{config_path}: hidden_size ({config.hidden_size}) is not divisible by "
                              f"num_attention_heads ({heads}) and no head_dim is given")
    eps = config.rms_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise CheckpointError(f"{config_path}: rms_norm_eps must be a small positive number, got {eps!r}")


def read_weight_map(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is damaged (not JSON with a 'weight_map'; {type(e).__name__}: {e}); "
                              f"re-download it") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names; re-download it")
    return weight_map


def read_safetensors_header(file: Path) -> tuple[int, dict[str, dict]]:
    """(byte offset where tensor data starts, the header's tensor entries without metadata), checked so that a
    corrupt header is a CheckpointError naming the file, not an OverflowError, MemoryError or KeyError."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or not 2 <= header_len <= size - 8:
            raise CheckpointError(f"{file} has a corrupt safetensors header (it declares {header_len} header bytes in "
                                  f"a {size}-byte file); the file is damaged or not safetensors, re-download it")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file} has a corrupt safetensors header ({e}); re-download it") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a corrupt safetensors header (not a JSON object); re-download it")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] or not isinstance(entry.get("dtype"), str)):
            raise CheckpointError(f"{file} has a corrupt safetensors header (bad entry for {name}); re-download it")
    return 8 + header_len, header


class SafetensorsCheckpoint:
    """Name -> tensor access over a single-file or sharded safetensors checkpoint, opened lazily."""

    def __init__(self, model_dir: Path, file_of: dict[str, Path] | None = None):
        """`file_of` (tensor -> shard path): shards that arrive one at a time (a streaming conversion adds and
        removes entries as it fetches and deletes them); checking them is then the caller's business."""
        self.model_dir = model_dir
        if file_of is not None:
            self.file_of, self._handles = file_of, {}
            return
        index_path = model_dir / "model.safetensors.index.json"
        if index_path.exists():
            self.file_of = {name: model_dir / shard for name, shard in read_weight_map(index_path).items()}
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{model_dir} has no *.safetensors files (pickled .bin checkpoints are not read)")
            self.file_of = {}
            for file in files:
                for name in self._check_complete(file):
                    self.file_of[name] = file
        for file in sorted(set(self.file_of.values())):
            if not file.exists():
                raise CheckpointError(f"shard {file.name} listed in {index_path.name} is missing from {model_dir}")
            self._check_complete(file)
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}); re-download it") from e

    @staticmethod
    def _check_complete(file: Path) -> list[str]:
        """Catch corrupt and truncated shards up front (the header says where the last tensor ends), and
        pre-quantized files whose manifest is gone; -> the tensor names in `file`."""
        data_start, header = read_safetensors_header(file)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        expected, actual = data_start + end, file.stat().st_size
        if actual < expected:
            raise CheckpointError(
                f"{file} is truncated ({actual} of {expected} bytes); the download or copy did not finish, fetch it again"
            )
        packed = [name for name, v in header.items() if PACKED_EXPERT.fullmatch(name) and v["dtype"] == "U8"]
        if packed:
            raise CheckpointError(
                f"{file.parent} looks like a pre-quantized offload_engine checkpoint ({file.name} holds packed "
                f"tensors such as {packed[0]}), but its {MANIFEST} is missing: restore that file (copy or "
                f"download the whole directory again), or quantize the original checkpoint again")
        return list(header)

    def close(self) -> None:
        """Drop the open files: pages read through safetensors' mmap stay resident (and count in RSS) until then;
        the next `get` reopens a file at the cost of one header parse."""
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = self._handle(name).get_tensor(name)
        self._check_shape(name, tuple(tensor.shape), shape)
        return tensor

    def _check_shape(self, name: str, found: tuple[int, ...], shape: tuple[int, ...]) -> None:
        if tuple(found) != tuple(shape):
            raise CheckpointError(
                f"tensor {name} in {self.file_of[name].name} has shape {tuple(found)}, but config.json implies "
                f"{tuple(shape)}; the config and the weights do not belong together")

    def _handle(self, name: str):
        if name not in self.file_of:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.model_dir}")
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = self._open(file)
        return self._handles[file]

    def get_expert(self, name: str, expert: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Row `expert` of the stacked tensor `name` of shape `shape`, reading that row's bytes only."""
        sliced = self._handle(name).get_slice(name)
        self._check_shape(name, tuple(sliced.get_shape()), shape)
        return sliced[expert]

    def trunk(self, name: str, shape: tuple[int, ...], renames: tuple[tuple[str, str], ...]) -> torch.Tensor:
        """A trunk tensor by its module name (see `disk_name`), copied into memory of its own: safetensors returns
        a view of its private mmap of the shard, which would keep the file mapped (and see it rewritten) for the
        engine's lifetime, and whose address is only 8-byte aligned: BLAS sums a 1-row matmul (Qwen2-MoE's
        shared-expert gate) in another order there than on the same values in aligned memory."""
        return self.get(disk_name(name, self, renames), shape).clone()


def disk_name(name: str, available: Container[str], renames: tuple[tuple[str, str], ...]) -> str:
    """A trunk tensor's name on disk: its module name, or the family's older name for it (the row's `renames`,
    e.g. Mixtral's block_sparse_moe.gate for mlp.gate); the module name when neither is there."""
    if name not in available:
        for module_part, disk_part in renames:
            if module_part in name and name.replace(module_part, disk_part) in available:
                return name.replace(module_part, disk_part)
    return name
