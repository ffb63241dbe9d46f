"""The private directory of a conversion in progress, and its journal: what makes a conversion resumable.

A conversion into DST writes everything into the hidden sibling `.DST.partial-KEY`, where KEY hashes the source
(path, or repo and commit) and the config, so a run with the same inputs finds the work of an earlier one. Each
part (a unit: one byte range of an output file) is written at its final offset, the file is fsync'd, and only
then is one line appended (and fsync'd) to `journal.jsonl`: part, file, offset, size, CRC-32 of the bytes, plus
a CRC of the line itself. On restart every journalled part is read back and checked against its CRC; a torn
line, a missing file or bytes that do not match are dropped and redone, so a half-written part is never trusted.
The source shards of a hub conversion are downloaded into `source/` inside it.

A `lock` file held with flock marks a directory in use: the kernel releases it when its process dies (even by
SIGKILL), so a directory nobody holds is stale: a later conversion to the same DST resumes it (same KEY) or
removes it (other KEY) and says so; one that is held is left alone and reported.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; stale directories are then always considered free
    fcntl = None

from ..checkpoint import CheckpointError

JOURNAL, LOCK = "journal.jsonl", "lock"


@contextmanager
def naming_a_full_disk(path: Path, needed: int) -> Iterator[None]:
    """A full disk while writing `path` (ENOSPC, an OSError that names no file) becomes an error that names the
    file and the space the rest of the conversion needs (`needed` bytes, besides what is already written)."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        size = lambda n: f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"  # noqa: E731
        free = shutil.disk_usage(path.parent).free
        raise CheckpointError(
            f"the disk is full: writing {path} failed (no space left on device); the rest of the conversion needs "
            f"about {size(needed)} more in {path.parent} ({size(free)} free now): free that much, then run the "
            f"same command again, which resumes and keeps every part already written") from e


def conversion_key(identity: dict, config: dict) -> str:
    raw = json.dumps({"source": identity, "config": config}, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:12]


def _try_lock(path: Path):
    """An open file holding an exclusive flock on `path`, or None if another process holds it."""
    handle = open(path, "a+")
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def clear_stale(dst: Path, keep: Path | None, log) -> None:
    """Remove `.DST.partial-*` / `.DST.old-*` left by killed conversions (not `keep`); report those still in use."""
    for path in sorted(dst.parent.glob(f".{dst.name}.partial-*")) + sorted(dst.parent.glob(f".{dst.name}.old-*")):
        if path == keep or not path.is_dir():
            continue
        lock = _try_lock(path / LOCK) if (path / LOCK).exists() else None
        if (path / LOCK).exists() and lock is None:
            log(f"note: {path} belongs to a conversion that is still running (left alone)")
            continue
        size = _size(path)
        shutil.rmtree(path, ignore_errors=True)
        if lock is not None:
            lock.close()
        log(f"removed {path} ({size / 1e6:.1f} MB), left by an interrupted conversion with other settings")


class Journal:
    """The partial directory of one conversion: lock, verified journal, append with fsync."""

    def __init__(self, partial: Path):
        self.dir = partial
        partial.mkdir(parents=True, exist_ok=True)
        self.lock = _try_lock(partial / LOCK)
        if self.lock is None:
            raise CheckpointError(f"another conversion is writing {partial} right now; wait for it to finish or stop "
                                  f"it, then run this again")
        self.lock.seek(0)
        self.lock.truncate()
        self.lock.write(f"{os.getpid()}\n")
        self.lock.flush()
        self.done: dict[str, dict] = {}
        self.file = None

    def resume(self, header: dict) -> None:
        """Trust the journalled tensors whose bytes check out; start the journal afresh with exactly those."""
        path = self.dir / JOURNAL
        entries = []
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()
            if lines and _decode(lines[0]) == header:
                entries = [e for e in map(_decode, lines[1:]) if e is not None]
        for entry in entries:
            if self._intact(entry):
                self.done[entry["tensor"]] = entry
        tmp = self.dir / (JOURNAL + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(_encode(e) for e in [header, *self.done.values()])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.dir)
        self.file = open(path, "a")

    def _intact(self, entry: dict) -> bool:
        try:
            with open(self.dir / entry["file"], "rb") as f:
                f.seek(entry["offset"])
                data = f.read(entry["nbytes"])
        except OSError:
            return False
        return len(data) == entry["nbytes"] and zlib.crc32(data) == entry["crc32"]

    def record(self, entry: dict) -> None:
        """Call after the entry's bytes are fsync'd: from here on they are trusted."""
        self.file.write(_encode(entry))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.done[entry["tensor"]] = entry

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.lock.close()

    def finish(self) -> None:
        """The output is complete: drop the bookkeeping before the directory becomes the checkpoint."""
        self.close()
        for name in (JOURNAL, LOCK):
            (self.dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.dir / "source", ignore_errors=True)


def _encode(entry: dict) -> str:
    body = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(body.encode()):08x} {body}\n"


def _decode(line: str) -> dict | None:
    """The entry of an intact line; None for a torn or damaged one (a kill in mid-write)."""
    crc, _, body = line.partition(" ")
    try:
        return json.loads(body) if f"{zlib.crc32(body.encode()):08x}" == crc else None
    except json.JSONDecodeError:
        return None


def _fsync_dir(path: Path) -> None:
    if sys.platform != "win32":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
