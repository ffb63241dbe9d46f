"""A CPU replay of the expert cache's stream protocol: stand-in streams and events, and a happens-before check.

    recorder = attach(engine.cache)      # before the first forward
    engine.generate_ids(...)
    assert not recorder.races, recorder.report()

`RecordingStreams` performs every copy at once (so results stay exact on CPU) and logs it with the stream it was
queued on, as every compute read of a slot. Each stand-in stream keeps a vector clock; recording an event captures
the stream's clock, waiting on one merges it. Two accesses to one buffer conflict when at least one writes; a
conflicting pair is a race unless the earlier one happens-before the later (same stream, or a chain of events).
Host syncs order nothing here on purpose: on a GPU they would hide a missing event only until timing changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass(frozen=True)
class StandInStream:
    name: str


@dataclass
class StandInEvent:
    clock: dict  # stream name -> operations of that stream that happen-before this event


@dataclass
class _Access:
    stream: str
    tick: int  # this access's position on its stream
    what: str


@dataclass
class _Buffer:
    write: _Access | None = None
    reads: list = field(default_factory=list)  # since the last write


class RecordingStreams:
    """Stand-in for CudaStreams (same interface) that logs and checks instead of running on a GPU."""

    device = torch.device("cpu")

    def __init__(self):
        self.compute, self.h2d, self.d2h = (StandInStream(n) for n in ("compute", "h2d", "d2h"))
        self.clocks = {s.name: {s.name: 0} for s in (self.compute, self.h2d, self.d2h)}
        self.log: list[tuple] = []  # ("copy", stream, dst, src) | ("read", stream, buffer) | ("wait", ...) | ...
        self.races: list[str] = []
        self.host_syncs = 0
        self._buffers: dict[Hashable, _Buffer] = {}

    # ---- the interface the cache uses ----
    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: StandInStream, dst_id: Hashable,
             src_id: Hashable) -> None:
        dst.copy_(src)
        access = self._tick(stream, f"copy {src_id} -> {dst_id} on {stream.name}")
        self._access(src_id, access, write=False)
        self._access(dst_id, access, write=True)
        self.log.append(("copy", stream.name, dst_id, src_id))

    def read(self, stream: StandInStream, buffer_id: Hashable) -> None:
        self._access(buffer_id, self._tick(stream, f"compute read of {buffer_id}"), write=False)
        self.log.append(("read", stream.name, buffer_id))

    def record(self, stream: StandInStream) -> StandInEvent:
        self.log.append(("record", stream.name))
        return StandInEvent(dict(self.clocks[stream.name]))

    def wait(self, stream: StandInStream, event: StandInEvent | None) -> None:
        if event is None:
            return
        clock = self.clocks[stream.name]
        for name, tick in event.clock.items():
            clock[name] = max(clock.get(name, 0), tick)
        self.log.append(("wait", stream.name))

    def done(self, event) -> bool:
        return True

    def host_wait(self, event) -> None:
        self.host_syncs += 1

    def synchronize(self) -> None:
        self.host_syncs += 1  # counted, but it orders nothing (see the module docstring)

    # ---- the check ----
    def _tick(self, stream: StandInStream, what: str) -> _Access:
        clock = self.clocks[stream.name]
        clock[stream.name] += 1
        return _Access(stream.name, clock[stream.name], what)

    def _before(self, earlier: _Access, later: _Access) -> bool:
        return self.clocks[later.stream].get(earlier.stream, 0) >= earlier.tick

    def _access(self, buffer_id: Hashable, access: _Access, write: bool) -> None:
        buffer = self._buffers.setdefault(buffer_id, _Buffer())
        earlier = ([buffer.write] if buffer.write else []) + (buffer.reads if write else [])
        for other in earlier:
            if not self._before(other, access):
                self.races.append(f"{buffer_id}: '{other.what}' and '{access.what}' are not ordered")
        if write:
            buffer.write, buffer.reads = access, []
        else:
            buffer.reads.append(access)

    def report(self, limit: int = 5) -> str:
        return f"{len(self.races)} race(s): " + "; ".join(self.races[:limit])


def attach(cache) -> RecordingStreams:
    """Swap a CPU cache's streams for a recorder (before any copy: every event the cache holds must be None)."""
    if cache.cuda:
        raise ValueError("the stream checker replays a CPU cache; load the engine with device='cpu'")
    cache.streams = RecordingStreams()
    return cache.streams


class SyncCounter(TorchDispatchMode):
    """Counts the reads that would block the host on a GPU: scalar reads and data-dependent shapes (seen by
    dispatch) and Tensor.tolist (which bypasses dispatch, so it is wrapped while the counter is active)."""

    SYNCING = frozenset({"_local_scalar_dense", "nonzero", "is_nonzero", "unique", "_unique2", "masked_select",
                         "equal", "repeat_interleave", "where.default"})  # where(cond): nonzero in disguise

    def __init__(self):
        super().__init__()
        self.count = 0
        self._tolist = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__ in self.SYNCING or func.__name__.split(".")[0] in self.SYNCING:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        tolist = self._tolist = torch.Tensor.tolist

        def counted(tensor):
            self.count += 1
            return tolist(tensor)
        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)
