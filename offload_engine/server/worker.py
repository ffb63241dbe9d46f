"""One engine, many requests at once: a bounded FIFO of jobs and the thread that generates them as one batch.

Continuous batching: the worker thread runs the engine's batch scheduler (batch.py) one step at a time. Before each
step, jobs whose client went away leave the batch (their slot is free at once) and waiting jobs join it in arrival
order, up to `max_batch` running; beyond that they wait in the FIFO, and beyond `max_queue` waiting a request is
refused (QueueFull, HTTP 429). A job leaves when it ends: EOS, a stop string, max_tokens, its client going away, or
an error. The worker reports each job's text pieces and its end through the job's `emit`, which the HTTP side turns
into a response. A step that raises (an expert failing, an interrupt) fails the jobs that were in it, with an error,
and the worker carries on with the others; each job has its own KV cache, so nothing else changes.

Shutdown: `drain()` answers every waiting job `Unavailable` (HTTP 503) at once and refuses new ones, so that no
job starts during the grace period; the running jobs go on, and `interrupt()` stops them with `Unavailable` too
if the grace period runs out.

Prefix reuse, per sequence: the KV caches of recently finished requests are kept (with the running ones, at most
`max_batch`, the KV caches the memory plan allows for); a request whose prompt extends one of their prompts (the
next turn of the same conversation, whose messages repeat the previous prompt and reply) takes that cache, cropped
to the longest shared prefix, and only the rest is prefilled. Any other prompt starts from an empty cache, so a
repeated request computes exactly what it computed the first time.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

from ..batch import MAX_BATCH, Batch, Generation
from ..chat import PrefixCache
from ..generate import SamplingParams, TextStream, new_sequence
from .metrics import Metrics
from .protocol import usage


@dataclass
class Started:
    """The worker took the job: a streamed response may begin."""


@dataclass
class Piece:
    text: str


@dataclass
class Done:
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int  # prompt tokens whose KV cache came from an earlier request

    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.completion_tokens, self.reused_tokens)


@dataclass
class Failed:
    message: str


@dataclass
class Unavailable:
    """The server is shutting down: the job was not run (or was stopped at the end of the grace period)."""
    message: str


Event = Union[Started, Piece, Done, Failed, Unavailable]


@dataclass
class Job:
    ids: list[int]  # the prompt's token ids
    params: SamplingParams
    emit: Callable[[Event], None]  # called from the worker thread
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    interrupted: str | None = None  # why the server stopped it (shutdown), if it did; else its client left

    def cancel(self) -> None:
        self.cancelled.set()


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass(eq=False)
class Running:
    """A job in the batch: its sequence, its KV cache (with the ids it holds), its text so far."""
    job: Job
    sequence: Generation
    prefix: PrefixCache
    reused: int
    text: TextStream
    last: float  # when its latest token (or its arrival) was seen


class Worker:
    def __init__(self, engine, metrics: Metrics | None = None, max_queue: int = 32, prefix_reuse: bool = True,
                 max_batch: int = MAX_BATCH):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine, self.metrics, self.max_queue, self.prefix_reuse = engine, metrics, max_queue, prefix_reuse
        self.max_batch = max_batch
        self.batch = Batch(engine.model, max_batch)
        self.finished: deque[tuple[list[int], PrefixCache]] = deque()  # (prompt, cache) of recent requests
        self.waiting: deque[Job] = deque()
        self.running: list[Running] = []
        self.joining: list[Job] = []  # taken from the FIFO, joining the batch
        self.condition = threading.Condition()
        self.closed = self.draining = False
        self.thread = threading.Thread(target=self._loop, name="offload-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job` behind the others; QueueFull when the batch is full and `max_queue` already wait."""
        with self.condition:
            if self.closed or self.draining:
                raise ShuttingDown("the server is shutting down: retry on another server or once it is back")
            # Counting the running jobs too makes the rule exact even before the worker has taken the latest jobs.
            if len(self.waiting) + len(self.joining) + len(self.running) >= self.max_batch + self.max_queue:
                raise QueueFull(f"the server is busy: {len(self.running)} requests are running and "
                                f"{len(self.waiting)} are waiting (at most {self.max_queue} may wait); retry later")
            self.waiting.append(job)
            self.condition.notify()

    def depth(self) -> int:
        return len(self.waiting)

    def batch_size(self) -> int:
        return len(self.running) + len(self.joining)

    def drain(self, message: str) -> None:
        """Answer every waiting job `Unavailable(message)` and refuse new ones; the running jobs go on."""
        with self.condition:
            self.draining = True
            waiting, self.waiting = list(self.waiting), deque()
        for job in waiting:
            job.emit(Unavailable(message))

    def interrupt(self, message: str) -> None:
        """Stop every running job before its next token; each is answered `Unavailable(message)`."""
        with self.condition:
            for job in [*self.joining, *(r.job for r in self.running)]:
                job.interrupted = message
                job.cancel()
            self.condition.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the current step (the running jobs are cancelled), dropping those that wait."""
        with self.condition:
            self.closed = True
            for job in [*self.waiting, *self.joining, *(r.job for r in self.running)]:
                job.cancel()
            self.condition.notify()
        self.thread.join(timeout)

    # ---- the worker thread ----
    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.waiting and not self.running and not self.closed:
                    self.condition.wait()
                if self.closed and not self.waiting and not self.running:
                    return
                self._drop_cancelled()
                while self.waiting and len(self.running) + len(self.joining) < self.max_batch:
                    self.joining.append(self.waiting.popleft())
            while self.joining:
                job = self.joining[0]
                try:
                    self._start(job)
                except Exception as e:  # a request that cannot start is answered; the others go on
                    job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
                finally:
                    with self.condition:
                        self.joining.pop(0)
            if self.running:
                self._step()

    def _drop_cancelled(self) -> None:
        """Jobs whose client went away (or that `interrupt` stopped) leave before the next step, freeing their slots
        (condition held)."""
        for running in [r for r in self.running if r.job.cancelled.is_set()]:
            running.sequence.cancel()
            interrupted = running.job.interrupted
            self._end(running, None if interrupted is None else Unavailable(interrupted))

    def _start(self, job: Job) -> None:
        """`job` joins the batch: its KV cache (reused or new), its sequence, its text stream."""
        if job.cancelled.is_set():  # its client left while it waited, or the server is stopping
            if job.interrupted is not None:
                job.emit(Unavailable(job.interrupted))
            elif self.metrics is not None:
                self.metrics.disconnects.inc()
            return
        job.emit(Started())
        prefix, keep = self._cache_for(job.ids)
        sequence = new_sequence(job.ids[keep:], job.params, prefix.kv_cache, self.engine.eos_ids, job.ids[:keep])
        self.batch.add(sequence)
        with self.condition:
            self.running.append(Running(job, sequence, prefix, keep, TextStream(self.engine.tokenizer,
                                                                                  job.params.stop), job.arrived))
            self._trim_finished()
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(job.ids))
            self.metrics.reused_tokens.inc(keep)

    def _cache_for(self, ids: list[int]) -> tuple[PrefixCache, int]:
        """The KV cache of the latest finished request whose prompt `ids` extends (cropped to the shared prefix),
        else a new one; and how many leading tokens of `ids` it holds. A prompt equal to the latest such one is a
        repeat, not a next turn: it starts afresh and computes what it computed the first time."""
        if self.prefix_reuse:
            for entry in reversed(self.finished):
                prompt, prefix = entry
                if ids[: len(prompt)] == prompt:
                    if len(ids) == len(prompt):
                        break
                    self.finished.remove(entry)
                    return prefix, prefix.reuse(ids)
        return PrefixCache(self.engine.model.config), 0

    def _step(self) -> None:
        by_sequence = {id(r.sequence): r for r in self.running}
        try:
            with self.engine.lock:  # other users of this engine (a notebook beside the server) wait too
                events = self.batch.step()
        except BaseException as e:  # a failed step fails its requests; the server carries on with the others
            message = f"generation failed: {type(e).__name__}: {e}"
            with self.condition:
                failed = [r for r in self.running if r.sequence.finish_reason == "error"]
                if not failed:  # raised before the step ran (the lock of a closed engine): every job fails
                    failed = list(self.running)
                    for running in failed:
                        running.sequence.cancel()
                for running in failed:
                    self._end(running, Failed(message))
            return
        if self.metrics is not None:
            self.metrics.batch_size.observe(self.batch.last_size)
        now = time.perf_counter()
        for sequence, token in events:
            running = by_sequence[id(sequence)]
            if token is not None:
                if self.metrics is not None:
                    latency = self.metrics.token_latency if len(sequence.tokens) > 1 else self.metrics.ttft
                    latency.observe(now - running.last)
                    self.metrics.generated_tokens.inc()
                running.last = now
                piece = running.text.push(token)
                if piece:
                    running.job.emit(Piece(piece))
                if running.text.stopped:
                    sequence.cancel()
            if sequence.finished:
                tail = running.text.finish()
                if tail:
                    running.job.emit(Piece(tail))
                reason = "length" if sequence.finish_reason == "length" and not running.text.stopped else "stop"
                done = Done(reason, len(running.job.ids), len(sequence.tokens), running.reused)
                with self.condition:
                    self._end(running, done)

    def _end(self, running: Running, event: Event | None) -> None:
        """`running` leaves (condition held): answered with `event` (None: its client went away); its KV cache is
        kept for reuse unless the step that ended it failed (the cache may hold half a forward)."""
        self.running.remove(running)
        if event is not None:
            running.job.emit(event)
        elif self.metrics is not None:
            self.metrics.disconnects.inc()
        if isinstance(event, Failed):
            return
        prefix, job = running.prefix, running.job
        prefix.sync(job.ids + running.sequence.tokens)
        self.finished.append((list(job.ids), prefix))
        self._trim_finished()

    def _trim_finished(self) -> None:
        """Kept and running KV caches together stay within `max_batch`, what the memory plan allows for."""
        while self.finished and len(self.finished) + len(self.running) > self.max_batch:
            self.finished.popleft()
