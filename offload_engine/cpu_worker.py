"""The CPU tier's worker thread (hybrid execution): runs the experts a layer call computes on the CPU while the
main thread queues the device's copies and kernels.

One thread, one job per layer call (all of the layer's CPU experts), so jobs run in the order they were given.
The CPU kernel's ctypes call and torch's ops release the GIL, so the main thread keeps queuing meanwhile. A job's
exception is raised where its result is taken (`CpuJob.result`), in the main thread; `CpuJob.settle` (the cache's
`recover`) cancels a job not yet started or waits for a running one, and drops whatever it raised.
"""

from __future__ import annotations

import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any, Callable

import torch


class CpuJob:
    """One layer call's CPU work, queued on the worker."""

    def __init__(self, future: Future):
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> Any:
        """Block until the job ends; its value, or the exception it raised."""
        return self._future.result()

    def settle(self) -> None:
        """Make sure the job no longer runs: cancel it if it has not started, else wait for it (errors dropped:
        the caller is already recovering from a failure)."""
        if self._future.cancel():
            return
        try:
            self._future.result()
        except (Exception, CancelledError):
            pass


class CpuWorker:
    """A single worker thread. `threads`: torch's thread count inside the jobs (the CPU kernel splits a matmul's
    output rows over that many); None keeps torch's."""

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-cpu-experts")

    def submit(self, work: Callable[[], Any]) -> CpuJob:
        """Queue `work()`; it returns (its value, the seconds it ran) through the job."""
        return CpuJob(self._pool.submit(self._run, work))

    def _run(self, work: Callable[[], Any]) -> tuple[Any, float]:
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # this worker thread's own count (OpenMP's is per thread)
        start = time.perf_counter()
        with torch.inference_mode():
            value = work()
        return value, time.perf_counter() - start

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
