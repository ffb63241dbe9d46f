"""`quantize_checkpoint`: convert a Mixtral checkpoint (local directory or hub repo) into a pre-quantized one,
shard by shard and resumably.

Unit of work: one output tensor (a trunk tensor, a norm, a router, an attention projection, a packed expert).
Each needs a few source tensors, hence a set of source shards (an expert's w1/w3/w2 or a layer's attention can
straddle two). The scheduler fetches shards in index order, converts every unit whose shards are all present as
soon as they are, and releases (for a hub source: deletes) a shard once no pending unit needs it. For Mixtral
that keeps at most two shards on disk; the output files are pre-sized and each unit is written at its final
offset, so the order in which units complete does not change a single output byte.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, SafetensorsCheckpoint, read_config
from ..config import load_config
from ..engine import MANIFEST, default_device
from ..experts import ExpertLayout
from ..prequantized import (AUX_FILES, FILE_METADATA, FORMAT, FORMAT_VERSION, ConfigLike, _layouts, _model_summary,
                            attention_shapes, plan_files)
from ..prequantized_io import TensorSpec, _bytes_of, safetensors_header
from ..quantize import quantize_matrix
from .journal import Journal, clear_stale, conversion_key
from .source import HubSource, LocalSource, open_source

# Rough rates for the time estimate printed with the plan (stated there as assumptions, not measurements).
DOWNLOAD_RATE = 100e6  # bytes/s from the hub (Colab typically sees 50-200 MB/s)
QUANT_RATE = {"cuda": 400e6, "cpu": 25e6}  # source bytes/s through HQQ (order of magnitude)


class ConversionError(CheckpointError):
    """A conversion that cannot start or go on; the message says what to do."""


class ConversionInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a conversion; the work done so far is kept for the next run."""


@dataclass
class Unit:
    """One output tensor: where it goes and which source tensors (hence shards) it needs."""
    spec: TensorSpec
    file: str
    offset: int  # absolute byte offset in the output file
    sources: tuple[str, ...]
    shards: frozenset[str]


@dataclass
class ConversionPlan:
    source: str
    dst: Path
    partial: Path
    total_units: int
    done_units: int
    output_bytes: int
    download_bytes: int
    shards_to_fetch: int
    shards_total: int
    disk_needed: int
    disk_free: int
    seconds: float
    streamed: bool  # shards deleted after use

    def describe(self) -> str:
        gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
        resumed = f", resuming: {self.done_units} of {self.total_units} tensors already done" if self.done_units else ""
        fetch = (f"download {gb(self.download_bytes)} ({self.shards_to_fetch} of {self.shards_total} shards)"
                 + (", one shard at a time, each deleted once converted" if self.streamed else "")
                 if self.shards_to_fetch else "source on disk, nothing to download")
        return (f"convert {self.source} -> {self.dst}{resumed}\n"
                f"  {fetch}\n"
                f"  output {gb(self.output_bytes)}; disk needed {gb(self.disk_needed)}, free {gb(self.disk_free)}\n"
                f"  time: about {self.seconds / 60:.0f} min (rough: assumes {DOWNLOAD_RATE / 1e6:.0f} MB/s download "
                f"and typical HQQ speed)")


def _source_names(spec: TensorSpec, weight_map: dict[str, str]) -> tuple[str, ...]:
    parts = spec.name.split(".")
    if not spec.name.startswith("model.layers."):
        return (spec.name,)
    prefix = ".".join(parts[:3])
    if ".experts." in spec.name:
        e = parts[-1]
        old = f"{prefix}.block_sparse_moe.experts.{e}"
        if f"{old}.w1.weight" in weight_map:
            return tuple(f"{old}.{m}.weight" for m in ("w1", "w3", "w2"))
        return (f"{prefix}.mlp.experts.gate_up_proj", f"{prefix}.mlp.experts.down_proj")
    if ".self_attn." in spec.name:
        return (spec.name + ".weight",)
    if spec.name.endswith("mlp.gate.weight"):
        old = f"{prefix}.block_sparse_moe.gate.weight"
        return (old if old in weight_map else spec.name,)
    return (spec.name,)


def _units(plan: dict[str, list[TensorSpec]], weight_map: dict[str, str]) -> tuple[list[Unit], dict[str, int]]:
    """Every output tensor as a unit, in file order, and every output file's total size."""
    units, sizes = [], {}
    for file, specs in plan.items():
        offset = len(safetensors_header(specs, FILE_METADATA))
        for spec in specs:
            sources = _source_names(spec, weight_map)
            missing = [s for s in sources if s not in weight_map]
            if missing:
                raise ConversionError(f"tensor {missing[0]} is missing from the source checkpoint's shards")
            units.append(Unit(spec, file, offset, sources, frozenset(weight_map[s] for s in sources)))
            offset += spec.nbytes
        sizes[file] = offset
    return units, sizes


def _compute(unit: Unit, checkpoint: SafetensorsCheckpoint, hf, cfg, quant_device: torch.device,
             layout: ExpertLayout) -> torch.Tensor:
    """The output tensor of one unit: exactly what engine.checkpoint_loader computes at load time."""
    dtype, name = cfg.torch_dtype, unit.spec.name
    if unit.spec.dtype != torch.uint8:  # trunk, norms, router: stored in the model dtype
        if name.endswith("mlp.gate.weight"):
            return checkpoint.router(int(name.split(".")[2]), hf).to(dtype)
        return checkpoint.get(name, unit.spec.shape).to(dtype)
    layer = int(name.split(".")[2])
    if ".self_attn." in name:
        proj = name.rsplit(".", 1)[1]
        weight = checkpoint.get(unit.sources[0], attention_shapes(hf)[proj])
        return quantize_matrix(weight.to(quant_device, dtype), cfg.quant.attention, dtype)[1]
    weights = {m: w.to(quant_device, dtype) for m, w in checkpoint.expert(layer, int(name.rsplit(".", 1)[1]), hf).items()}
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8, device=quant_device)  # zeroed: reproducible padding
    layout.pack(weights, buffer)
    return buffer


class _Sigterm:
    """SIGTERM handled like Ctrl-C (a KeyboardInterrupt in the main thread) while a conversion runs."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _check_destination(src: LocalSource | HubSource, dst: Path, overwrite: bool) -> None:
    if isinstance(src, LocalSource):
        s, d = src.dir.resolve(), dst.resolve()
        if d == s or s in d.parents:
            raise ConversionError(f"the destination {dst} is {'the source' if d == s else 'inside the source'} "
                                  f"{src.dir}; choose a directory outside it")
        if d in s.parents:
            raise ConversionError(f"the destination {dst} contains the source {src.dir}; replacing it would delete "
                                  f"the source: choose another directory")
        if (src.dir / MANIFEST).exists():
            raise ConversionError(f"{src.dir} is already a pre-quantized checkpoint; load it directly, or convert "
                                  f"the original")
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists; remove it, choose another destination, or pass overwrite=True")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst} is a file; choose a directory as the destination")


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, config: ConfigLike = None,
                        progress: bool = True, device: str | torch.device | None = None, overwrite: bool = False,
                        keep_source: bool = False, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Quantize the Mixtral checkpoint `src` (a directory or a hub repo id) as `config` says and write a
    pre-quantized checkpoint to `dst`. Quantization runs on `device` (default: CUDA if available), the way
    `load(src)` would there, so `load(dst)` gives exactly the logits of `load(src, config)` on that kind of device.

    A hub source is downloaded one shard at a time and each shard is deleted once converted (unless `keep_source`:
    then shards go to the Hugging Face cache, or `cache_dir`, and stay). An interrupted conversion (Ctrl-C,
    SIGTERM, a killed process) resumes where it stopped when called again with the same arguments. The plan
    (download, disk, time) is printed first through `log` (default: stderr when `progress`)."""
    cfg = load_config(config)
    log = log or ((lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda _: None))
    device = torch.device(device) if device is not None else default_device()
    quant_device = device if device.type == "cuda" else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConversionError(f"device {str(device)!r} was requested but torch sees no CUDA GPU; use device='cpu'")
    dst = Path(dst).expanduser()
    source = open_source(src, keep_source, revision, cache_dir)
    _check_destination(source, dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.parent / f".{dst.name}.partial-{conversion_key(source.identity, cfg.to_dict())}"
    clear_stale(dst, partial, log)
    journal = Journal(partial)
    try:
        with _Sigterm():
            source.prepare(partial, progress)
            out = _convert(source, dst, partial, journal, cfg, quant_device, progress, log)
    except KeyboardInterrupt as e:
        journal.close()
        done = len(journal.done)
        raise ConversionInterrupted(
            f"conversion stopped ({e or 'Ctrl-C'}); {done} converted tensors are kept in {partial}: run the same "
            f"command again to resume, or delete that directory") from None
    except BaseException:
        journal.close()
        if not journal.done:  # nothing worth keeping
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _convert(source, dst: Path, partial: Path, journal: Journal, cfg, quant_device, progress: bool, log) -> Path:
    hf = read_config(source.dir)
    plan = plan_files(hf, cfg)  # raises QuantizationError (a ValueError) for a group size that does not fit
    layout = ExpertLayout.build(hf.hidden_size, hf.intermediate_size, cfg.quant.experts, cfg.torch_dtype)
    units, sizes = _units(plan, source.weight_map)
    journal.resume({"format_version": FORMAT_VERSION, "files": sizes}, sizes)
    pending = [u for u in units if u.spec.name not in journal.done]
    conversion_plan = _plan(source, dst, partial, units, pending, sizes, quant_device)
    log(conversion_plan.describe())
    if conversion_plan.disk_needed > conversion_plan.disk_free:
        raise ConversionError(f"the conversion needs {conversion_plan.disk_needed / 1e9:.2f} GB of free disk in "
                              f"{dst.parent} but {conversion_plan.disk_free / 1e9:.2f} GB are free; free some space "
                              f"or choose another destination")
    fds = {}
    for name, specs in plan.items():  # pre-sized files, header first; resumed ones keep their journalled bytes
        path = partial / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(fd).st_size != sizes[name]:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, sizes[name])
        os.pwrite(fd, safetensors_header(specs, FILE_METADATA), 0)
        fds[name] = fd
    try:
        _run_units(source, pending, fds, journal, hf, cfg, quant_device, layout, progress)
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    return _finish(source, dst, partial, journal, hf, cfg, plan, sizes)


def _plan(source, dst, partial, units, pending, sizes, quant_device) -> ConversionPlan:
    needed_shards = {s for u in pending for s in u.shards}
    to_fetch = sorted(needed_shards & source.missing)
    download = sum(source.sizes[s] for s in to_fetch)
    streamed = isinstance(source, HubSource) and not source.keep_source
    largest = sorted((source.sizes[s] for s in to_fetch), reverse=True)
    shard_disk = sum(largest[:2]) if streamed else download
    output = sum(sizes.values())
    written = sum(u.spec.nbytes for u in units) - sum(u.spec.nbytes for u in pending)
    source_bytes = sum(source.sizes[s] for s in needed_shards)
    free = shutil.disk_usage(dst.parent).free
    seconds = download / DOWNLOAD_RATE + source_bytes / QUANT_RATE[quant_device.type]
    return ConversionPlan(source.name, dst, partial, len(units), len(units) - len(pending), output, download,
                          len(to_fetch), len(source.sizes), output - written + shard_disk, free, seconds, streamed)


def _run_units(source, pending: list[Unit], fds: dict[str, int], journal: Journal, hf, cfg, quant_device,
               layout: ExpertLayout, progress: bool) -> None:
    order = {s: i for i, s in enumerate(sorted(source.sizes))}
    checkpoint = SafetensorsCheckpoint(source.dir, file_of={})
    present: set[str] = set()
    bar = tqdm(total=len(pending), desc="converting tensors", disable=not progress)
    while pending:
        ready = [u for u in pending if u.shards <= present]
        if not ready:  # fetch the first shard (in index order) that a pending unit still lacks
            shard = min((s for u in pending for s in u.shards - present), key=order.__getitem__)
            path = source.fetch(shard)
            SafetensorsCheckpoint._check_complete(path)
            checkpoint.file_of.update({n: path for n, s in source.weight_map.items() if s == shard})
            present.add(shard)
            continue
        for unit in ready:
            tensor = _compute(unit, checkpoint, hf, cfg, quant_device, layout)
            data = _bytes_of(tensor.cpu())
            os.pwrite(fds[unit.file], data, unit.offset)
            os.fsync(fds[unit.file])  # the bytes are durable before the journal vouches for them
            journal.record({"tensor": unit.spec.name, "file": unit.file, "offset": unit.offset,
                            "nbytes": data.nbytes, "crc32": zlib.crc32(data)})
            checkpoint.close()  # unmap the source shards, or their pages stay resident (host RAM is scarce)
            bar.update()
        done = {u.spec.name for u in ready}
        pending[:] = [u for u in pending if u.spec.name not in done]
        for shard in present - {s for u in pending for s in u.shards}:
            checkpoint.file_of = {n: p for n, p in checkpoint.file_of.items() if source.weight_map[n] != shard}
            source.release(shard)
            present.discard(shard)
    bar.close()


def _finish(source, dst: Path, partial: Path, journal: Journal, hf, cfg, plan, sizes) -> Path:
    from .. import __version__

    files, tensors = {}, {}
    for name, specs in plan.items():
        files[name] = {"nbytes": sizes[name], "tensors": [s.name for s in specs]}
        for s in specs:
            tensors[s.name] = {"file": name, "dtype": str(s.dtype).removeprefix("torch."), "shape": list(s.shape),
                               "crc32": journal.done[s.name]["crc32"]}
            if s.dtype == torch.uint8:  # a packed buffer: name its byte layout (bits, group size, segments)
                tensors[s.name]["layout"] = "expert" if ".experts." in s.name else f"attention.{s.name.rsplit('.', 1)[1]}"
    for name in AUX_FILES:
        if (source.dir / name).exists():
            shutil.copyfile(source.dir / name, partial / name)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"offload_engine {__version__}",
                "config": cfg.to_dict(), "model": _model_summary(hf), "layouts": _layouts(hf, cfg),
                "files": files, "tensors": tensors, "aux_files": [n for n in AUX_FILES if (partial / n).exists()]}
    journal.finish()
    # The manifest is what marks a directory as pre-quantized, so it is the last file written.
    with open(partial / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
        os.replace(partial, dst)
        shutil.rmtree(old)
    else:
        os.replace(partial, dst)
    return dst
