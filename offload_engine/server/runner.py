"""Running the app under uvicorn: `serve` in the foreground, `BackgroundServer` in a thread (tests, scripts)."""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI

from .app import create_app


GRACE_S = 5  # at shutdown, how long running requests may go on before they are cancelled


def serve(engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **app_options) -> None:
    """Serve `engine` until Ctrl-C / SIGTERM. `app_options`: model_name, api_key, max_queue, prefix_reuse."""
    uvicorn.run(create_app(engine, **app_options), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=GRACE_S)


class BackgroundServer:
    """A uvicorn server for `app` on a thread; port 0 picks a free one. A context manager."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=GRACE_S))
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
