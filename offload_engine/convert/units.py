"""The units of a conversion: each output byte range computed from exactly one source tensor.

An output tensor is a plain trunk tensor (embeddings, a norm, a router, a bias), a quantized linear layer (one
packed buffer) or an expert (one packed buffer of three quantized matrices and, for some families, three
biases). HQQ quantizes each matrix on its own, so an expert is one unit per matrix or bias, each filling its own
byte range of the expert's buffer. A unit therefore reads one source tensor, hence one shard, wherever the
checkpoint's shard boundaries fall (an expert's gate, up and down may sit in different shards). The exception is
an MXFP4 expert matrix, which reads its `_blocks` and `_scales`: the GPT-OSS releases keep them side by side, but
a re-sharded copy may put a boundary between them, so such a unit runs once both shards are there, and
`schedule` keeps the earlier shard until then.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..anatomy import Anatomy, TrunkTensor
from ..checkpoint import SafetensorsCheckpoint, disk_name
from ..expert_tensors import expert_sources, read_expert_tensor
from ..experts import ExpertLayout
from ..prequantized import FILE_METADATA
from ..prequantized_io import TensorSpec, safetensors_header
from ..quantize import quantize_into, quantize_matrix


@dataclass(frozen=True)
class Unit:
    key: str  # journal key: the output tensor, plus "/w1" etc. for an expert's matrices and biases
    tensor: str  # output tensor name
    file: str
    offset: int  # absolute byte offset in the output file
    nbytes: int
    sources: tuple[str, ...]  # the source tensors it reads: one, or an MXFP4 matrix's `_blocks` and `_scales`
    shards: frozenset[str]  # the shards holding them
    matrix: str | None = None  # w1 w3 w2 b1 b3 b2 for expert units


def build_units(plan: dict[str, list[TensorSpec]], weight_map: dict[str, str], layout: ExpertLayout,
                anatomy: Anatomy) -> tuple[list[Unit], dict[str, int]]:
    """Every unit, in output order, and every output file's total size. Raises KeyError(source) if one is missing."""
    units, sizes = [], {}
    packed = {t.name for t in anatomy.quantized()}
    renames = anatomy.family.renames
    for file, specs in plan.items():
        offset = len(safetensors_header(specs, FILE_METADATA))
        for spec in specs:
            if ".experts." in spec.name:
                _, _, layer, _, expert = spec.name.split(".")
                for name in layout.names:
                    start, nbytes = layout.region(name)
                    sources = expert_sources(anatomy, weight_map, int(layer), int(expert), name)
                    units.append(Unit(f"{spec.name}/{name}", spec.name, file, offset + start, nbytes, sources,
                                      frozenset(weight_map[s] for s in sources), name))
            else:
                weight = f"{spec.name}.weight" if spec.name in packed else spec.name
                source = disk_name(weight, weight_map, renames)
                units.append(Unit(spec.name, spec.name, file, offset, spec.nbytes, (source,),
                                  frozenset({weight_map[source]})))
            offset += spec.nbytes
        sizes[file] = offset
    return units, sizes


def compute(unit: Unit, checkpoint: SafetensorsCheckpoint, anatomy: Anatomy, cfg, quant_device: torch.device,
            layout: ExpertLayout) -> torch.Tensor:
    """The unit's bytes (a CPU or device tensor of `unit.nbytes` bytes): what engine.checkpoint_loader computes."""
    dtype = cfg.torch_dtype
    if unit.matrix is not None:
        _, _, layer, _, expert = unit.tensor.split(".")
        tensor = read_expert_tensor(checkpoint, anatomy, int(layer), int(expert), unit.matrix)
        buffer = torch.zeros(layout.nbytes, dtype=torch.uint8, device=quant_device)  # zeroed: reproducible padding
        tensor = tensor.to(quant_device, dtype)
        if unit.matrix in layout.matrices:
            quantize_into(tensor, layout.matrices[unit.matrix], buffer)
        else:  # a bias, kept as is
            layout.biases[unit.matrix].view(buffer).copy_(tensor)
        start, nbytes = layout.region(unit.matrix)
        return buffer[start:start + nbytes]
    trunk: TrunkTensor = next(t for t in anatomy.trunk if t.name == unit.tensor)
    (source_name,) = unit.sources
    source = checkpoint.get(source_name, trunk.shape)
    if trunk.part is None:
        return source.to(trunk.dtype(cfg))
    return quantize_matrix(source.to(quant_device, dtype), getattr(cfg.quant, trunk.part), dtype)[1]


@dataclass
class Step:
    """Fetch `shard`, convert `units` (every pending unit whose shards are all there now), then release `release`
    (the shards no later unit reads)."""

    shard: str
    units: list[Unit] = field(default_factory=list)
    release: list[str] = field(default_factory=list)


def schedule(pending: list[Unit], shard_order: list[str]) -> list[Step]:
    """The shards the pending units read, one step each in `shard_order` (the index order). A unit runs at the
    step of its last shard to arrive; a shard is released after the last step that reads it, which is its own
    step unless an MXFP4 unit straddles it and a later shard."""
    rank = {s: i for i, s in enumerate(shard_order)}
    last = lambda unit: max(unit.shards, key=rank.__getitem__)  # noqa: E731
    steps = {s: Step(s) for s in sorted({s for u in pending for s in u.shards}, key=rank.__getitem__)}
    released_after: dict[str, str] = {}
    for unit in pending:
        steps[last(unit)].units.append(unit)
        for shard in unit.shards:
            released_after[shard] = max(released_after.get(shard, shard), last(unit), key=rank.__getitem__)
    for shard, after in released_after.items():
        steps[after].release.append(shard)
    return list(steps.values())
