"""File I/O for pre-quantized checkpoints: safetensors written tensor by tensor, read straight into buffers.

The safetensors format is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape and
[start, end) byte offsets into the data that follows), then the tensors' raw bytes back to back. Writing it
ourselves lets the header go first (every size is known from the layouts) and each tensor go to its offset as
soon as it is quantized (convert/run.py), so no layer is ever held whole in memory; the files stay readable by
any safetensors reader.

`check_manifest_entries` checks what the manifest lists (files, auxiliary files, tensors) against the layout the
config implies, before anything is read: a manifest is data from a download, trusted for nothing it can get wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Collection

import torch

from .checkpoint import CheckpointError, read_safetensors_header

ST_DTYPES = {torch.uint8: "U8", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


class PrequantizedError(CheckpointError):
    """A pre-quantized directory that does not match its manifest; the message names the file."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is already contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `specs` back to back, in this order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": ST_DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format recommends 8-byte aligned data
    return len(raw).to_bytes(8, "little") + raw


def read_header(path: Path) -> tuple[int, dict]:
    """(byte offset where tensor data starts, header dict without metadata) of a safetensors file."""
    try:
        return read_safetensors_header(path)
    except CheckpointError as e:
        raise PrequantizedError(str(e)) from e


def read_into(f: BinaryIO, path: Path, offset: int, out: torch.Tensor) -> None:
    """Read `out.numel()` bytes at `offset` straight into the contiguous uint8 CPU tensor `out`."""
    view, done = memoryview(out.numpy()), 0
    f.seek(offset)
    while done < view.nbytes:  # readinto may return less than asked for large reads
        got = f.readinto(view[done:])
        if not got:
            raise PrequantizedError(f"{path} ended early (truncated while loading); re-download it")
        done += got


def dtype_name(dtype: torch.dtype) -> str:
    """How the manifest names a dtype: 'uint8', 'bfloat16', ..."""
    return str(dtype).removeprefix("torch.")


def check_manifest_entries(model_dir: Path, manifest_name: str, manifest: dict, plan: dict[str, list[TensorSpec]],
                           aux_names: Collection[str], layout_of: Callable[[str], str]) -> None:
    """The manifest's `files`, `aux_files` and `tensors` against `plan` (file -> its tensors, from the config):
    every file listed is one of the plan's or of `aux_names`, named plainly inside `model_dir`; every tensor entry is
    one the plan has, recorded with the plan's file, dtype, shape and (packed tensors) byte layout `layout_of(name)`.
    Raises PrequantizedError naming the manifest, the entry and what was expected."""
    where = model_dir / manifest_name
    fix = "the manifest was edited or damaged: re-download the checkpoint, or quantize the original one again"
    for key, names, allowed in (("files", list(manifest["files"]), plan), ("aux_files", manifest.get("aux_files", []),
                                                                            aux_names)):
        for name in names:
            if not isinstance(name, str) or not name:
                raise PrequantizedError(f"{where}: '{key}' lists {json.dumps(name)}, which is not a file name; {fix}")
            if Path(name).name != name or name in (".", "..") or "\\" in name:
                raise PrequantizedError(f"{where}: '{key}' lists {name!r}, a path outside {model_dir} (a checkpoint's "
                                        f"files are plain names in its own directory); {fix}")
            if name not in allowed:
                raise PrequantizedError(f"{where}: '{key}' lists {name!r}, which is not a file of this checkpoint "
                                        f"(its layout has {_some(allowed)}); {fix}")
    for name, entry in manifest["files"].items():
        listed, planned = entry.get("tensors"), [spec.name for spec in plan[name]]
        if listed is not None and listed != planned:
            raise PrequantizedError(f"{where}: the tensors listed for file {name} differ from the ones this model's "
                                    f"layout puts there ({_some(planned)}); {fix}")
    home = {spec.name: (file, spec) for file, specs in plan.items() for spec in specs}
    for name, entry in manifest["tensors"].items():
        if name not in home:
            raise PrequantizedError(f"{where}: 'tensors' lists {name}, which this model does not have; {fix}")
        file, spec = home[name]
        expected = {"file": file, "dtype": dtype_name(spec.dtype), "shape": list(spec.shape)}
        if spec.dtype == torch.uint8:
            expected["layout"] = layout_of(name)
        recorded = {key: entry.get(key) for key in expected}
        if recorded != expected:
            wrong = ", ".join(f"{key} {json.dumps(recorded[key])} (expected {json.dumps(expected[key])})"
                              for key in expected if recorded[key] != expected[key])
            raise PrequantizedError(f"{where}: tensor {name} in {file} is recorded with {wrong}; {fix}")


def _some(names: Collection[str], most: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
