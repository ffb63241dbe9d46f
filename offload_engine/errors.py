"""User errors on the command line: one `error: ...` line on stderr and exit status 2, never a traceback.

Every CLI and script wraps its `main` with `user_errors` (or calls `run_guarded`). What counts as a user error:
ValueError (ConfigError, CheckpointError, bad sampling options, ...), OSError (a missing or unwritable file),
running out of memory for the requested plan (NotEnoughMemory) or of page-lockable host memory (HostLockError),
and `UsageError`. Ctrl-C prints `interrupted` and exits 130. `--debug` on the command line or
OFFLOAD_ENGINE_DEBUG=1 shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from typing import Callable, Sequence

DEBUG_ENV = "OFFLOAD_ENGINE_DEBUG"


class UsageError(Exception):
    """Something the user can fix (path, config, option); printed as one `error: ...` line, exit status 2."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from .memory import NotEnoughMemory  # imported late: this module must stay importable on its own
    from .streams import HostLockError

    return (UsageError, ValueError, OSError, NotEnoughMemory, HostLockError)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")


def one_line(error: BaseException) -> str:
    """The error's message on one line; an OSError names its file."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return re.sub(r"\s*\n\s*", " ", text).strip()


def run_guarded(fn: Callable[[], int], debug: bool, describe: Callable[[BaseException], str] = one_line) -> int:
    """Run `fn`; a user error becomes one `error: ...` line and status 2, Ctrl-C status 130."""
    try:
        return fn()
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        return 130
    except user_error_types() as e:
        if debug:
            raise
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2


def user_errors(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Decorate a script's `main(argv)` so that user errors end it with one line (see the module docstring)."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        return run_guarded(lambda: main(argv), debug_requested(argv))

    return wrapper
