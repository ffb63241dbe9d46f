"""`offload-serve`: an OpenAI-compatible HTTP server for one Engine (needs the `serve` extra).

    from offload_engine.server import create_app, serve, BackgroundServer
    serve(engine, port=8000)                          # blocks; Ctrl-C stops it
    with BackgroundServer(create_app(engine)) as s:   # a loopback server in a thread (tests, scripts)
        print(s.url)                                  # http://127.0.0.1:PORT

Files: protocol.py (OpenAI request/response shapes), worker.py (the FIFO and the generating thread), metrics.py
(Prometheus), app.py (routes), runner.py (uvicorn), cli.py (the command).
"""

__all__ = ["create_app", "serve", "BackgroundServer", "require_extra"]


def require_extra() -> None:
    """A clear ImportError when the `serve` extra is missing (the package itself imports without it)."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the server needs the `serve` extra ({e.name} is missing): pip install "
                          f"'offload_engine[serve]' (or pip install -e \".[serve]\" in a clone)") from e


def __getattr__(name: str):
    # Lazy, so that `offload_engine.server.cli` can report a missing extra in one line instead of a traceback.
    if name in ("create_app", "serve", "BackgroundServer"):
        require_extra()
        from . import app, runner

        return {"create_app": app.create_app, "serve": runner.serve, "BackgroundServer": runner.BackgroundServer}[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
