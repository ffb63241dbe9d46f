"""`quantize_checkpoint`: convert an MoE checkpoint (local directory or hub repo) into a pre-quantized one,
shard by shard and resumably.

Work is split into units (units.py), each computing one byte range of the output from one source tensor, hence
one shard (an MXFP4 matrix from two tensors, which may sit in two shards). The converter fetches the shards in
index order (a hub source downloads each one then), converts every unit the shard completes, writing each at its
final offset in its output file, and releases (for a hub source: deletes) the shard before fetching the next,
unless a unit still waits for a later shard: peak disk is the output plus one shard, or plus the shards that an
MXFP4 matrix's `_blocks` and `_scales` straddle (the printed plan counts them).
Every unit is journalled once durable (journal.py), so a killed conversion resumes without redoing any of them;
the order in which units complete does not change a single output byte.
"""

from __future__ import annotations

import importlib.metadata
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

from ..anatomy import Anatomy
from ..checkpoint import MANIFEST, CheckpointError, SafetensorsCheckpoint, read_config
from ..config import load_config
from ..experts import ExpertLayout
from ..loader import resolve_device
from ..prequantized import (AUX_FILES, FILE_METADATA, FORMAT, FORMAT_VERSION, ConfigLike, _layouts, _model_summary,
                            layout_key, plan_files)
from ..prequantized_io import TensorSpec, _bytes_of, safetensors_header
from .journal import Journal, clear_stale, conversion_key, naming_a_full_disk
from .source import HubSource, LocalSource, open_source
from .units import Step, build_units, compute, schedule

# Rough rates for the time estimate printed with the plan (stated there as assumptions, not measurements).
DOWNLOAD_RATE = 100e6  # bytes/s from the hub (Colab typically sees 50-200 MB/s)
# Source bytes/s through HQQ, order of magnitude: CPU from BENCHMARKS.md section 3 (1.3 GiB of bf16 in ~600 s on a
# busy 2-core machine); CUDA guessed from HQQ's published A100 timings, scaled down for a T4 (not measured here).
QUANT_RATE = {"cuda": 100e6, "cpu": 3e6}


class ConversionError(CheckpointError):
    """A conversion that cannot start or go on; the message says what to do."""


class ConversionCancelled(ConversionError):
    """The `confirm` callback said no: nothing was downloaded or written."""


class ConversionInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a conversion; the work done so far is kept for the next run."""


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
        gb = lambda n: f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"  # noqa: E731
        resumed = f", resuming: {self.done_units} of {self.total_units} parts already done" if self.done_units else ""
        fetch = (f"download {gb(self.download_bytes)} ({self.shards_to_fetch} of {self.shards_total} shards)"
                 + (", one shard at a time, each deleted once converted" if self.streamed else "")
                 if self.shards_to_fetch else "source on disk, nothing to download")
        return (f"convert {self.source} -> {self.dst}{resumed}\n"
                f"  {fetch}\n"
                f"  output {gb(self.output_bytes)}; disk needed {gb(self.disk_needed)}, free {gb(self.disk_free)}\n"
                f"  time: about {self.seconds / 60:.0f} min (rough: assumes {DOWNLOAD_RATE / 1e6:.0f} MB/s download "
                f"and typical HQQ speed)")


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
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists; remove it, choose another destination, or pass overwrite=True")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst} is a file; choose a directory as the destination")


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, config: ConfigLike = None,
                        progress: bool = True, device: str | torch.device | None = None, overwrite: bool = False,
                        keep_source: bool = False, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = None,
                        confirm: Callable[[ConversionPlan], bool] | None = None) -> Path:
    """Quantize the MoE checkpoint `src` (a directory or a hub repo id) as `config` says and write a
    pre-quantized checkpoint to `dst`. Quantization runs on `device` (default: CUDA if available), the way
    `load(src)` would there, so `load(dst)` gives exactly the logits of `load(src, config)` on that kind of device.

    A hub source is downloaded one shard at a time and each shard is deleted once converted (unless `keep_source`:
    then shards go to the Hugging Face cache, or `cache_dir`, and stay). An interrupted conversion (Ctrl-C,
    SIGTERM, a killed process) resumes where it stopped when called again with the same arguments. The plan
    (download, disk, time) is printed first through `log` (default: stderr when `progress`), then `confirm(plan)`
    (if given) decides whether to go on."""
    cfg = load_config(config)

    def stderr(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    notice = log or stderr  # removing someone's files is said even when quiet
    log = log or (stderr if progress else (lambda _: None))
    device = resolve_device(device)
    quant_device = device if device.type == "cuda" else torch.device("cpu")
    dst = Path(dst).expanduser()
    source = open_source(src, keep_source, revision, cache_dir)
    _check_destination(source, dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.parent / f".{dst.name}.partial-{conversion_key(source.identity, cfg.to_dict())}"
    clear_stale(dst, partial, notice)
    journal = Journal(partial)
    try:
        with _Sigterm():
            source.prepare(partial, progress)
            out = _convert(source, dst, partial, journal, cfg, quant_device, progress, log, confirm)
    except KeyboardInterrupt as e:
        journal.close()
        done = len(journal.done)
        raise ConversionInterrupted(
            f"conversion stopped ({e or 'Ctrl-C'}); {done} converted parts are kept in {partial}: run the same "
            f"command again to resume, or delete that directory") from None
    except BaseException:
        journal.close()
        if not journal.done:  # nothing worth keeping
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _convert(source, dst: Path, partial: Path, journal: Journal, cfg, quant_device, progress: bool, log,
             confirm) -> Path:
    hf = read_config(source.dir)
    plan = plan_files(hf, cfg)  # raises QuantizationError (a ValueError) for a group size that does not fit
    anatomy = Anatomy.of(hf, cfg.torch_dtype)
    layout = anatomy.expert_layout(cfg)
    try:
        units, sizes = build_units(plan, source.weight_map, layout, anatomy)
    except KeyError as e:
        raise ConversionError(f"tensor {e.args[0]} is missing from the source checkpoint {source.name}") from None
    journal.resume({"format_version": FORMAT_VERSION, "files": sizes})
    pending = [u for u in units if u.key not in journal.done]
    steps = schedule(pending, sorted(source.sizes))
    conversion_plan = _plan(source, dst, partial, units, pending, steps, sizes, quant_device)
    log(conversion_plan.describe())
    if conversion_plan.disk_needed > conversion_plan.disk_free:
        raise ConversionError(f"the conversion needs {conversion_plan.disk_needed / 1e9:.2f} GB of free disk in "
                              f"{dst.parent} but {conversion_plan.disk_free / 1e9:.2f} GB are free; free some space "
                              f"or choose another destination")
    if confirm is not None and not confirm(conversion_plan):
        raise ConversionCancelled(f"conversion of {source.name} cancelled; no shard was downloaded")
    fds = {}
    for name, specs in plan.items():  # header first; resumed files keep their journalled bytes
        fd = os.open(partial / name, os.O_RDWR | os.O_CREAT, 0o644)
        fds[name] = fd
        with naming_a_full_disk(partial / name, conversion_plan.disk_needed):
            os.pwrite(fd, safetensors_header(specs, FILE_METADATA), 0)
    try:
        _run_units(source, steps, len(pending), fds, journal, anatomy, cfg, quant_device, layout, progress)
        for name, fd in fds.items():
            os.ftruncate(fd, sizes[name])  # a no-op unless an earlier run left a longer file
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    return _finish(source, dst, partial, journal, hf, cfg, plan, sizes, quant_device)


def _plan(source, dst, partial, units, pending, steps: list[Step], sizes, quant_device) -> ConversionPlan:
    needed_shards = {s.shard for s in steps}
    to_fetch = sorted(needed_shards & source.missing)
    download = sum(source.sizes[s] for s in to_fetch)
    streamed = isinstance(source, HubSource) and not source.keep_source
    shard_disk = _peak_download(steps, source) if streamed else download
    output = sum(sizes.values())
    written = sum(u.nbytes for u in units) - sum(u.nbytes for u in pending)
    source_bytes = sum(source.sizes[s] for s in needed_shards)
    free = shutil.disk_usage(dst.parent).free
    seconds = download / DOWNLOAD_RATE + source_bytes / QUANT_RATE[quant_device.type]
    return ConversionPlan(source.name, dst, partial, len(units), len(units) - len(pending), output, download,
                          len(to_fetch), len(source.sizes), output - written + shard_disk, free, seconds, streamed)


def _peak_download(steps: list[Step], source: HubSource) -> int:
    """The most bytes of downloaded shards on disk at once when each is deleted as `steps` release it."""
    held = peak = 0
    for step in steps:
        held += source.sizes[step.shard] if step.shard in source.missing else 0
        peak = max(peak, held)
        held -= sum(source.sizes[s] for s in step.release if s in source.missing)
    return peak


def _run_units(source, steps: list[Step], total: int, fds: dict[str, int], journal: Journal, anatomy: Anatomy, cfg,
               quant_device, layout: ExpertLayout, progress: bool) -> None:
    """Fetch shards in index order; convert the units each one completes, then release the shards done with."""
    checkpoint = SafetensorsCheckpoint(source.dir, file_of={})
    bar = tqdm(total=total, desc="converting", unit="matrix", disable=not progress)
    to_write = sum(unit.nbytes for step in steps for unit in step.units)  # output bytes not written yet
    for step in steps:
        path = source.fetch(step.shard)
        SafetensorsCheckpoint._check_complete(path)
        checkpoint.file_of.update({n: path for n, s in source.weight_map.items() if s == step.shard})
        for unit in step.units:
            data = _bytes_of(compute(unit, checkpoint, anatomy, cfg, quant_device, layout).cpu())
            with naming_a_full_disk(journal.dir / unit.file, to_write):
                os.pwrite(fds[unit.file], data, unit.offset)
                os.fsync(fds[unit.file])  # the bytes are durable before the journal vouches for them
            with naming_a_full_disk(journal.dir / "journal.jsonl", to_write):
                journal.record({"tensor": unit.key, "file": unit.file, "offset": unit.offset,
                                "nbytes": data.nbytes, "crc32": zlib.crc32(data)})
            to_write -= unit.nbytes
            checkpoint.close()  # unmap the source shard, or its pages stay resident (host RAM is scarce)
            bar.update()
        for shard in step.release:
            checkpoint.file_of = {n: p for n, p in checkpoint.file_of.items() if source.weight_map[n] != shard}
            source.release(shard)
    bar.close()


def package_version() -> str:
    """The installed offload_engine's version, for the manifest's `created_by` (read from the package metadata:
    importing it from offload_engine/__init__.py, which imports this module, would be an import circle)."""
    try:
        return importlib.metadata.version("offload_engine")
    except importlib.metadata.PackageNotFoundError:  # run from a clone without `pip install`
        return "(not installed)"


def _tensor_crcs(partial: Path, plan: dict[str, list[TensorSpec]]) -> dict[str, int]:
    """CRC-32 of every output tensor, read back from the finished files: what loading will check."""
    crcs = {}
    for name, specs in plan.items():
        with open(partial / name, "rb") as f:
            f.seek(len(safetensors_header(specs, FILE_METADATA)))
            for spec in specs:
                crcs[spec.name] = zlib.crc32(f.read(spec.nbytes))
    return crcs


def _finish(source, dst: Path, partial: Path, journal: Journal, hf, cfg, plan, sizes, quant_device) -> Path:
    crcs = _tensor_crcs(partial, plan)
    files, tensors = {}, {}
    for name, specs in plan.items():
        files[name] = {"nbytes": sizes[name], "tensors": [s.name for s in specs]}
        for s in specs:
            tensors[s.name] = {"file": name, "dtype": str(s.dtype).removeprefix("torch."), "shape": list(s.shape),
                               "crc32": crcs[s.name]}
            if s.dtype == torch.uint8:  # a packed buffer: name its byte layout (bits, group size, segments)
                kind = "expert" if ".experts." in s.name else layout_key(s.name)
                tensors[s.name]["layout"] = kind
    for name in AUX_FILES:
        if (source.dir / name).exists():
            shutil.copyfile(source.dir / name, partial / name)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"offload_engine {package_version()}",
                "family": hf.model_type, "config": cfg.to_dict(), "model": _model_summary(hf),
                "layouts": _layouts(hf, cfg),
                "files": files, "tensors": tensors, "aux_files": [n for n in AUX_FILES if (partial / n).exists()],
                # hqq's optimizer runs in fp16 on CUDA and fp32 on CPU: the bytes depend on where they were made.
                "quantized_on": quant_device.type}
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
