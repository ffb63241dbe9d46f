"""A CPU replay of the expert cache's stream protocol: stand-in streams and events, and a happens-before check.

    recorder = attach(engine.cache)      # before the first forward
    engine.generate_ids(...)
    assert not recorder.races, recorder.report()

`RecordingStreams` performs every copy at once (so results stay exact on CPU) and logs it with the stream it was
queued on, as every compute read of a slot and every read of a host slot by the CPU worker (hybrid execution:
the CPU is a third actor with a clock of its own, `cpu`). Each stand-in stream keeps a vector clock; recording an
event captures the stream's clock, waiting on one merges it. Two accesses to one buffer conflict when at least one writes; a
conflicting pair is a race unless the earlier one happens-before the later (same stream, or a chain of events).
Host syncs order nothing here on purpose: on a GPU they would hide a missing event only until timing changes.

`TimedStreams` adds simulated time to the same stand-ins (the timed replay, offload_engine/replay.py): see its
docstring.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .cpu_worker import CpuJob


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
        self.compute, self.h2d, self.d2h, self.cpu = (StandInStream(n) for n in ("compute", "h2d", "d2h", "cpu"))
        self.clocks = {s.name: {s.name: 0} for s in (self.compute, self.h2d, self.d2h, self.cpu)}
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
        self._access(buffer_id, self._tick(stream, f"{stream.name} read of {buffer_id}"), write=False)
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


@dataclass(eq=False)
class Op:
    """One piece of work on a timeline: a copy (`left` in bytes), a kernel or host work (seconds), or a wait."""
    timeline: str  # "host", "compute", "h2d", "d2h" or "cpu"
    kind: str  # "copy", "kernel", "work" or "wait"
    left: float
    deps: tuple = ()  # ops that must end before this one starts (besides the one before it on its timeline)
    label: str = ""
    issued: float = 0.0  # host time when it was queued
    seq: int = 0  # order in which the host queued device ops
    start: float | None = None
    end: float | None = None
    bound_by: "Op | None" = None  # the op whose end started this one: the critical path runs through it


@dataclass
class TimedEvent(StandInEvent):
    op: Op | None = None  # the last op queued on the stream when the event was recorded (None: nothing yet)


class TimedStreams(RecordingStreams):
    """Stand-in streams that also carry simulated time, for replaying the real cache with stated speeds.

    Five timelines: the host, which runs the caller's program in order, three device streams (compute, h2d,
    d2h) and the CPU worker (`cpu`: hybrid execution's CPU experts, `cpu_work`), each a FIFO of ops that start when the host has queued them, the op before them on their stream
    has ended and every event they wait for has been reached. A copy moves `copy_bytes` at its direction's rate,
    both directions at once share `duplex` bytes/s in proportion to their rates (the sum of the two rates:
    full duplex); a kernel (`kernel`) and host work (`host_work`) take the seconds given; `host_wait` blocks the
    host until an event is reached. Device time is simulated lazily, up to what the host has queued: nothing
    the host queues later can start earlier, so every figure is final once the host has moved past it.
    The race check of RecordingStreams runs as well.
    """

    def __init__(self, h2d: float, d2h: float, copy_bytes: int, duplex: float | None = None, keep_ops: bool = False):
        super().__init__()
        if min(h2d, d2h) <= 0 or (duplex is not None and duplex <= 0):
            raise ValueError("copy rates must be positive")
        self.rate = {"h2d": float(h2d), "d2h": float(d2h)}
        self.share = min(1.0, (h2d + d2h if duplex is None else duplex) / (h2d + d2h))  # of each rate, both on
        self.copy_bytes = copy_bytes
        self.now = 0.0  # device time simulated so far
        self.host_op = Op("host", "work", 0.0, start=0.0, end=0.0)  # the host's latest op: it ends at host time
        self.queues = {name: deque() for name in ("compute", "h2d", "d2h", "cpu")}
        self.last = dict.fromkeys(self.queues)  # the latest op queued per device timeline
        self.last_done: dict[str, Op] = {}  # the latest op finished per device timeline
        self.busy = dict.fromkeys(("host", *self.queues), 0.0)  # seconds each timeline was working
        self.both_copying_s = 0.0  # seconds during which copies ran in both directions at once
        self.queued = 0  # device ops queued so far
        self.ops: list[Op] | None = [] if keep_ops else None  # every finished op, if asked (tests, timelines)

    @property
    def host_now(self) -> float:
        return self.host_op.end

    # ---- the host ----
    def host_work(self, seconds: float, label: str = "host") -> None:
        start = self.host_now
        self._host(Op("host", "work", 0.0, label=label, start=start, end=start + seconds, bound_by=self.host_op))

    def host_wait(self, event) -> None:
        super().host_wait(event)
        op = getattr(event, "op", None)
        if op is None:
            return
        self._advance(until_op=op)
        end = max(self.host_now, op.end)
        self._host(Op("host", "wait", 0.0, label=f"wait for {op.label}", start=end, end=end,
                      bound_by=op if op.end > self.host_now else self.host_op))

    def synchronize(self) -> None:
        super().synchronize()
        for op in list(self.last.values()):
            if op is not None:
                self.host_wait(TimedEvent({}, op))

    def _host(self, op: Op) -> None:
        self.busy["host"] += op.end - op.start if op.kind == "work" else 0.0
        self.host_op = op
        if self.ops is not None:
            self.ops.append(op)

    # ---- the device: the interface the cache uses, and kernels ----
    def copy(self, dst, src, stream: StandInStream, dst_id: Hashable, src_id: Hashable) -> None:
        super().copy(dst, src, stream, dst_id, src_id)
        self._queue(stream.name, "copy", float(self.copy_bytes), label=f"{src_id} -> {dst_id}")

    def kernel(self, seconds: float, label: str = "kernel") -> None:
        self._queue("compute", "kernel", seconds, label=label)

    def cpu_work(self, seconds: float, label: str = "cpu") -> TimedEvent:
        """Queue `seconds` of work on the CPU worker (after what the cache made it wait for: `wait(cpu, ...)`);
        returns the event the host waits on for its results."""
        self._queue("cpu", "kernel", seconds, label=label)
        return TimedEvent({}, self.last["cpu"])

    def record(self, stream: StandInStream) -> TimedEvent:
        return TimedEvent(super().record(stream).clock, self.last[stream.name])

    def wait(self, stream: StandInStream, event) -> None:
        super().wait(stream, event)
        op = getattr(event, "op", None)
        if op is not None:
            self._advance(until=self.host_now)
            if op.end is None:
                self._queue(stream.name, "wait", 0.0, deps=(op,), label=f"wait for {op.label}")

    def done(self, event) -> bool:
        self._advance(until=self.host_now)
        op = getattr(event, "op", None)
        return op is None or op.end is not None

    def _queue(self, timeline: str, kind: str, amount: float, deps: tuple = (), label: str = "") -> None:
        self._advance(until=self.host_now)
        self.queued += 1
        op = Op(timeline, kind, amount, deps=(self.host_op, *deps), label=label, issued=self.host_now, seq=self.queued)
        self.queues[timeline].append(op)
        self.last[timeline] = op
        self._start_ready()

    # ---- the simulation ----
    def _advance(self, until: float = float("inf"), until_op: Op | None = None) -> None:
        """Simulate the device timelines up to time `until`, or until `until_op` has ended. Every op that can
        start at the current time has started (`_start_ready` runs after each op is queued or ends)."""
        if until_op is None and until <= self.now:
            return
        queues = self.queues.values()
        while until_op is None or until_op.end is None:
            active = [queue[0] for queue in queues if queue and queue[0].start is not None]
            if not active:
                if until_op is not None:
                    raise RuntimeError(f"timed replay deadlock: '{until_op.label}' can never end")
                self.now = max(self.now, until)
                return
            both = sum(op.kind == "copy" for op in active) == 2
            rates = [(self.rate[op.timeline] * self.share if both else self.rate[op.timeline])
                     if op.kind == "copy" else 1.0 for op in active]
            ends = [op.left / rate for op, rate in zip(active, rates)]
            step = min(ends)
            if until_op is None and self.now + step > until:
                self._progress(active, rates, until - self.now, both)
                self.now = until
                return
            self._progress(active, rates, step, both)
            self.now += step
            for op, end in zip(active, ends):
                if end - step <= 1e-12:  # within a picosecond of its end
                    self._finish(op)
            self._start_ready()

    def _start_ready(self) -> None:
        for queue in self.queues.values():
            while queue and queue[0].start is None and all(dep.end is not None for dep in queue[0].deps):
                op = queue[0]
                previous = [self.last_done[op.timeline]] if op.timeline in self.last_done else []
                op.bound_by = max(previous + list(op.deps), key=lambda dep: dep.end)
                op.start, op.deps = self.now, ()
                if op.left > 0.0:
                    break
                self._finish(op)

    def _progress(self, active: list[Op], rates: list[float], seconds: float, both: bool) -> None:
        if both:
            self.both_copying_s += seconds
        for op, rate in zip(active, rates):
            op.left -= rate * seconds

    def _finish(self, op: Op) -> None:
        op.end, op.left = self.now, 0.0
        self.queues[op.timeline].popleft()
        self.last_done[op.timeline] = op
        if op.kind != "wait":
            self.busy[op.timeline] += op.end - op.start
        if self.ops is not None:
            self.ops.append(op)

    def critical_path(self, op: Op | None = None) -> dict:
        """Seconds of each timeline's work on the chain of ops that ended last (or at `op`): every op on it
        started when the one before it ended, so the parts add up to the end time."""
        parts = dict.fromkeys(self.busy, 0.0)
        op = op or self.host_op
        while op is not None:
            parts[op.timeline] += op.end - op.start
            op = op.bound_by
        return parts


def attach(cache) -> RecordingStreams:
    """Swap a CPU cache's streams for a recorder (before any copy: every event the cache holds must be None)."""
    if cache.cuda:
        raise ValueError("the stream checker replays a CPU cache; load the engine with device='cpu'")
    cache.streams = RecordingStreams()
    return cache.streams


class SyncCounter(TorchDispatchMode):
    """Counts the reads that would block the host on a GPU: scalar reads and data-dependent shapes (seen by
    dispatch) and Tensor.tolist (which bypasses dispatch, so it is wrapped while the counter is active), plus the
    host's waits for the CPU worker's results (hybrid execution: `CpuJob.result`, wrapped likewise)."""

    SYNCING = frozenset({"_local_scalar_dense", "nonzero", "is_nonzero", "unique", "_unique2", "masked_select",
                         "equal", "repeat_interleave", "where.default"})  # where(cond): nonzero in disguise

    def __init__(self):
        super().__init__()
        self.count = 0
        self._tolist = self._result = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__ in self.SYNCING or func.__name__.split(".")[0] in self.SYNCING:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        tolist = self._tolist = torch.Tensor.tolist
        result = self._result = CpuJob.result

        def counted(tensor):
            self.count += 1
            return tolist(tensor)

        def counted_result(job):
            self.count += 1
            return result(job)
        torch.Tensor.tolist, CpuJob.result = counted, counted_result
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, CpuJob.result = self._tolist, self._result
        return super().__exit__(*exc)


class OpCounter(TorchDispatchMode):
    """Counts the torch ops that do work (views and other metadata-only ops excluded): on CUDA each is a kernel
    launch or a host-side op the critical path pays for, and the same forward on CPU dispatches the same ops.
    `parts` ({part: function names}) attributes each op to the innermost listed function on the Python stack
    (`other` if none)."""

    VIEWS = frozenset({"view", "_unsafe_view", "slice", "select", "detach", "t", "unsqueeze", "squeeze", "expand",
                       "reshape", "as_strided", "alias", "transpose", "permute", "split", "unbind", "chunk", "narrow",
                       "lift_fresh", "_reshape_alias", "view_as_real", "view_as_complex", "split_with_sizes"})

    def __init__(self, parts: dict[str, set[str]] | None = None):
        super().__init__()
        self.parts = parts or {}
        self.ops: dict[str, int] = {}  # op name -> count
        self.by_part: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            self.ops[name] = self.ops.get(name, 0) + 1
            part = self._part()
            self.by_part[part] = self.by_part.get(part, 0) + 1
        return func(*args, **(kwargs or {}))

    def _part(self) -> str:
        if not self.parts:
            return "other"
        frame = sys._getframe(2)
        while frame is not None:
            for part, names in self.parts.items():
                if frame.f_code.co_name in names:
                    return part
            frame = frame.f_back
        return "other"

    @property
    def total(self) -> int:
        return sum(self.ops.values())
