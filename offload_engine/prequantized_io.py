"""File I/O for pre-quantized checkpoints: safetensors written tensor by tensor, read straight into buffers.

The safetensors format is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape and
[start, end) byte offsets into the data that follows), then the tensors' raw bytes back to back. Writing it
ourselves lets the header go first (every size is known from the layouts) and each tensor go to its offset as
soon as it is quantized (convert/run.py), so no layer is ever held whole in memory; the files stay readable by
any safetensors reader.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
