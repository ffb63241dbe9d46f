"""One engine, one request at a time: a bounded FIFO of jobs and the thread that generates them.

Jobs are admitted in arrival order while at most `max_queue` wait behind the running one; the single
worker thread takes them one by one, so the engine never sees two generations at once whatever the engine
itself does about locking. The worker reports each job's text pieces and its end through the job's `emit`,
which the HTTP side turns into a response. A job's `cancel()` (its client went away) stops generation before
the next token.

Shutdown: `drain()` answers every waiting job `Unavailable` (HTTP 503) at once and refuses new ones, so that no
job starts during the grace period; the running job goes on, and `interrupt()` stops it with `Unavailable` too
if the grace period runs out.

Prefix reuse: the KV cache of the previous request is kept; when a request's prompt extends the previous prompt
(the next turn of the same conversation, whose messages repeat the previous prompt and reply), the cache is
cropped to the longest shared prefix and only the rest is prefilled. Any other prompt starts from an empty cache,
so a repeated request computes exactly what it computed the first time.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

from ..chat import PrefixCache
from ..generate import SamplingParams, generate_tokens, stream_text
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
    reused_tokens: int  # prompt tokens whose KV cache came from the previous request

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


class Worker:
    def __init__(self, engine, metrics: Metrics | None = None, max_queue: int = 32, prefix_reuse: bool = True):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine, self.metrics, self.max_queue, self.prefix_reuse = engine, metrics, max_queue, prefix_reuse
        self.prefix = PrefixCache(engine.model.config)
        self.last_prompt: list[int] = []
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None
        self.condition = threading.Condition()
        self.closed = self.draining = False
        self.thread = threading.Thread(target=self._loop, name="offload-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job` behind the others; QueueFull when `max_queue` already wait."""
        with self.condition:
            if self.closed or self.draining:
                raise ShuttingDown("the server is shutting down: retry on another server or once it is back")
            # Counting the running job too makes the rule exact even before the worker has taken the first job.
            if len(self.waiting) + (self.running is not None) > self.max_queue:
                raise QueueFull(f"the server is busy: one request is running and {len(self.waiting)} are waiting "
                                f"(at most {self.max_queue} may wait); retry later")
            self.waiting.append(job)
            self.condition.notify()

    def depth(self) -> int:
        return len(self.waiting)

    def drain(self, message: str) -> None:
        """Answer every waiting job `Unavailable(message)` and refuse new ones; the running job goes on."""
        with self.condition:
            self.draining = True
            waiting, self.waiting = list(self.waiting), deque()
        for job in waiting:
            job.emit(Unavailable(message))

    def interrupt(self, message: str) -> None:
        """Stop the running job before its next token; it is answered `Unavailable(message)`."""
        with self.condition:
            if self.running is not None:
                self.running.interrupted = message
                self.running.cancel()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the running job (which is cancelled), dropping those that wait."""
        with self.condition:
            self.closed = True
            for job in [*self.waiting, *([self.running] if self.running else [])]:
                job.cancel()
            self.condition.notify()
        self.thread.join(timeout)

    # ---- the worker thread ----
    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.waiting and not self.closed:
                    self.condition.wait()
                if self.closed and not self.waiting:
                    return
                job = self.running = self.waiting.popleft()
            try:
                if not job.cancelled.is_set():
                    job.emit(Started())
                    with self.engine.lock:  # other users of this engine (a notebook beside the server) wait too
                        self._run(job)
                elif self.metrics is not None:  # its client left while it waited
                    self.metrics.disconnects.inc()
            except Exception as e:  # a failed generation answers its request; the server carries on
                self.prefix.clear()  # the cache may hold half a forward
                self.last_prompt = []
                job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
            finally:
                with self.condition:
                    self.running = None

    def _reusable(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` keep their KV cache from the previous request (cache cropped to it)."""
        previous = self.last_prompt
        self.last_prompt = list(ids)
        if self.prefix_reuse and len(ids) > len(previous) and ids[: len(previous)] == previous:
            return self.prefix.reuse(ids)
        self.prefix.clear()
        return 0

    def _run(self, job: Job) -> None:
        engine, params, ids, metrics = self.engine, job.params, job.ids, self.metrics
        keep = self._reusable(ids)
        tokens = generate_tokens(engine.model, ids[keep:], params, self.prefix.kv_cache, engine.eos_ids, ids[:keep])
        reply: list[int] = []
        last = job.arrived

        def tracked():
            """The tokens, observed; cancellation is checked before each (the next forward pass)."""
            nonlocal last
            while not job.cancelled.is_set():
                token = next(tokens, None)
                if token is None:
                    return
                now = time.perf_counter()
                if metrics is not None:
                    (metrics.token_latency if reply else metrics.ttft).observe(now - last)
                    metrics.generated_tokens.inc()
                last = now
                reply.append(token)
                yield token

        try:
            for piece in stream_text(tracked(), engine.tokenizer, params.stop):
                job.emit(Piece(piece))
        finally:
            tokens.close()
            self.prefix.sync(ids + reply)
        if metrics is not None:
            metrics.prompt_tokens.inc(len(ids))
            metrics.reused_tokens.inc(keep)
        if job.interrupted is not None:
            job.emit(Unavailable(job.interrupted))
            return
        if job.cancelled.is_set():
            if metrics is not None:
                metrics.disconnects.inc()
            return
        text = engine.tokenizer.decode(reply, skip_special_tokens=True)
        stopped = len(reply) < params.max_new_tokens or any(s in text for s in params.stop)
        job.emit(Done("stop" if stopped else "length", len(ids), len(reply), keep))
