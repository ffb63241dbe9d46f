"""Reading Hugging Face Mixtral checkpoints tensor by tensor, with errors that say what is wrong.

Nothing here instantiates the full-precision model: tensors are read lazily from the safetensors files one
at a time (`safe_open`), quantized by the caller, and dropped, so host RAM stays near the quantized size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import MixtralConfig

from .experts import MATRICES


class CheckpointError(ValueError):
    """A model directory or hub repo that cannot be loaded; the message names the file and what to do."""


DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


DEMO_DIR = Path(__file__).resolve().parent / "demo"  # the small model shipped in the package


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local directory as is; "demo" for the packaged demo model; otherwise a hub repo id, downloaded (with
    progress) into the hub cache."""
    path = Path(model).expanduser()
    if str(model) == "demo" and not path.exists():
        path = DEMO_DIR
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and *.safetensors")
        return path
    name = str(model)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"model path {name!r} does not exist (and is not a hub repo id like 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=DOWNLOAD_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}: {e}); check the repo id, "
            f"your network, and `huggingface-cli login` for gated repos, or pass a local directory"
        ) from e


def read_config(model_dir: Path) -> MixtralConfig:
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{model_dir} has no config.json: it is not a Hugging Face model directory")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
    if raw.get("model_type") != "mixtral":
        raise CheckpointError(
            f"{config_path} describes a {raw.get('model_type')!r} model; offload_engine runs Mixtral "
            f"(model_type 'mixtral') checkpoints only"
        )
    config = MixtralConfig.from_dict(raw)
    if config.hidden_act != "silu":
        raise CheckpointError(f"{config_path}: hidden_act {config.hidden_act!r} is not Mixtral's 'silu'")
    return config


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
            weight_map = json.loads(index_path.read_text())["weight_map"]
            self.file_of = {name: model_dir / shard for name, shard in weight_map.items()}
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{model_dir} has no *.safetensors files (pickled .bin checkpoints are not read)")
            self.file_of = {}
            for file in files:
                self._check_complete(file)
                for name in self._open(file).keys():
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
    def _check_complete(file: Path) -> None:
        """Catch truncated shards up front: the header says where the last tensor ends."""
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{file} has a corrupt safetensors header; re-download it") from e
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        expected, actual = 8 + header_len + end, file.stat().st_size
        if actual < expected:
            raise CheckpointError(
                f"{file} is truncated ({actual} of {expected} bytes); the download or copy did not finish, fetch it again"
            )

    def close(self) -> None:
        """Drop the open files: pages read through safetensors' mmap stay resident (and count in RSS) until then;
        the next `get` reopens a file at the cost of one header parse."""
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.model_dir}")
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = self._open(file)
        tensor = self._handles[file].get_tensor(name)
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {name} in {file.name} has shape {tuple(tensor.shape)}, but config.json implies {tuple(shape)}; "
                f"the config and the weights do not belong together"
            )
        return tensor

    def expert(self, layer: int, expert: int, config: MixtralConfig) -> dict[str, torch.Tensor]:
        """One expert's w1, w3 [I, H] and w2 [H, I], from per-expert tensors or transformers 5's fused ones."""
        H, I = config.hidden_size, config.intermediate_size
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        if f"{prefix}.w1.weight" in self or f"model.layers.{layer}.mlp.experts.gate_up_proj" not in self:
            shapes = {"w1": (I, H), "w3": (I, H), "w2": (H, I)}
            return {m: self.get(f"{prefix}.{m}.weight", shapes[m]) for m in MATRICES}
        fused = f"model.layers.{layer}.mlp.experts"
        gate_up = self.get(f"{fused}.gate_up_proj", (config.num_local_experts, 2 * I, H))[expert]
        down = self.get(f"{fused}.down_proj", (config.num_local_experts, H, I))[expert]
        return {"w1": gate_up[:I].clone(), "w3": gate_up[I:].clone(), "w2": down.clone()}

    def router(self, layer: int, config: MixtralConfig) -> torch.Tensor:
        shape = (config.num_local_experts, config.hidden_size)
        name = f"model.layers.{layer}.block_sparse_moe.gate.weight"
        return self.get(name if name in self else f"model.layers.{layer}.mlp.gate.weight", shape)
