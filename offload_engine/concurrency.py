"""Sharing one engine between threads: every generation and chat turn runs alone, under the engine's lock.

The model, its expert cache (slots, staged prefetches, pending guesses) and its counters are one mutable state,
so two forwards must never interleave. `EngineLock` is reentrant (a caller that already holds it, e.g. code that
generates while consuming its own stream, does not deadlock itself), and streams hold it from their first item
until they are exhausted, closed or garbage-collected (`locked_iter`). Ownership follows the stream: a stream
resumed in another thread (a web server's thread pool does that) carries the lock with it, and whichever thread
finalises an abandoned stream may release it; `threading.RLock` allows neither.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, TypeVar

T = TypeVar("T")


class EngineLock:
    """A reentrant lock whose holder is the running thread, and which a suspended stream can carry along."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None  # thread id of the holder
        self._depth = 0

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            while self._owner is not None:
                self._cond.wait()
            self._owner, self._depth = me, 1

    def release(self) -> None:
        """Release one level; allowed from any thread (a stream may be finalised by the garbage collector)."""
        with self._cond:
            if self._depth == 0:
                raise RuntimeError("EngineLock released more often than acquired")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify()

    def adopt(self) -> None:
        """Make the current thread the holder (a stream held the lock while suspended and resumes here)."""
        with self._cond:
            self._owner = threading.get_ident()

    @property
    def locked(self) -> bool:
        return self._owner is not None

    def __enter__(self) -> "EngineLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def locked_iter(lock: EngineLock, items: Iterator[T]) -> Iterator[T]:
    """`items` with `lock` held from the first item until the end, `close()` or garbage collection; `items` is
    closed too, so whatever cleanup it has runs while the lock is still held."""
    with lock:
        try:
            for item in items:
                yield item
                lock.adopt()  # resumed, possibly in another thread: that thread now holds the lock
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()


class BusyGuard:
    """Refuses a second concurrent use of one object (a ChatSession) with a clear error, instead of waiting."""

    def __init__(self, what: str):
        self.what, self._busy, self._mutex = what, False, threading.Lock()

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._mutex:
            if self._busy:
                raise RuntimeError(
                    f"{self.what} is already in use (a reply is being generated, possibly in another thread, or an "
                    f"earlier stream was not finished or closed); finish or close() that stream first, or give each "
                    f"thread its own session with engine.chat()")
            self._busy = True
        try:
            yield
        finally:
            self._busy = False
