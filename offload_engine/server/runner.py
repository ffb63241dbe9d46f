"""Running the app under uvicorn: `serve` in the foreground, `BackgroundServer` in a thread (tests, scripts).

Shutdown (Ctrl-C, SIGTERM, or `BackgroundServer.stop`): requests still waiting for the engine are answered 503 at
once, whether they stream or not (none starts during the grace period); the running ones have `grace_s` seconds
(default GRACE_S, or $OFFLOAD_SERVE_GRACE_S) to finish, then they are stopped with a 503 or, when they stream, an
SSE error event and `[DONE]`. The process then exits.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import uvicorn
from fastapi import FastAPI

from .app import create_app

GRACE_ENV = "OFFLOAD_SERVE_GRACE_S"
GRACE_S = 5.0  # at shutdown, how long the running requests may go on before they are stopped
SHUTDOWN_MESSAGE = "the server is shutting down: retry on another server or once it is back"


def grace_from_env() -> float:
    value = os.environ.get(GRACE_ENV, "").strip()
    try:
        grace = float(value) if value else GRACE_S
    except ValueError:
        grace = -1.0
    if not grace >= 0:  # NaN too
        raise ValueError(f"${GRACE_ENV} must be a number of seconds >= 0, got {value!r}")
    return grace


class Server(uvicorn.Server):
    """uvicorn's server, answering the requests that wait for `app`'s engine before its own graceful shutdown."""

    def __init__(self, app: FastAPI, grace_s: float, **config):
        # uvicorn's own limit is a backstop: the running requests are stopped (and answered) at grace_s.
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=grace_s + 5, **config))
        self.worker, self.grace_s = app.state.worker, grace_s

    async def shutdown(self, sockets=None) -> None:
        self.worker.drain(SHUTDOWN_MESSAGE)
        stop_running = asyncio.get_running_loop().call_later(self.grace_s, self.worker.interrupt, SHUTDOWN_MESSAGE)
        try:
            await super().shutdown(sockets)
        finally:
            stop_running.cancel()


def serve(engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", grace_s: float | None = None,
          **app_options) -> None:
    """Serve `engine` until Ctrl-C / SIGTERM. `app_options`: model_name, api_key, max_queue, prefix_reuse, max_batch."""
    grace = grace_from_env() if grace_s is None else grace_s
    server = Server(create_app(engine, **app_options), grace, host=host, port=port, log_level=log_level)
    server.run()
    if not server.started:
        raise OSError(f"the server could not start on {host}:{port} (see the log above)")


class BackgroundServer:
    """A uvicorn server for `app` on a thread; port 0 picks a free one. A context manager."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 grace_s: float = GRACE_S):
        self.app = app
        self.server = Server(app, grace_s, host=host, port=port, log_level=log_level)
        self.thread = threading.Thread(target=self.server.run, name="offload-serve-http", daemon=True)
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port} within {timeout:.0f} s")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
