"""Shared CLI plumbing: human vs ``--json`` output and the error-to-exit-code policy.

Exit codes: 0 success, 2 user error (bad input, unknown name, conflict), 1 failure of the operation,
130 interrupted. Every command runs its body through :func:`run_command` so the policy lives here.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TextIO, TypeVar

from rich.console import Console
from rich.text import Text

from novacron.errors import NovacronError, UserError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# Rich lays out for 80 columns when the output is not a terminal (a log, a CI job, a pipe); the
# summary tables then wrap every cell. Such output gets this width unless COLUMNS says otherwise.
UNTERMINATED_WIDTH = 120


def _width(stream: TextIO) -> int | None:
    if "COLUMNS" in os.environ or stream.isatty():
        return None  # Rich's own choice: the terminal's width, or COLUMNS
    return UNTERMINATED_WIDTH


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))

T = TypeVar("T")


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    # The message is plain text (it may contain brackets, e.g. a regex): no rich markup in it.
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)
    raise SystemExit(code)


def run_command(body: Callable[[], T], as_json: bool = False) -> T:
    """Run a command body, turning typed errors into a message and the right exit code."""
    try:
        return body()
    except UserError as exc:
        if as_json:
            emit_json({"error": exc.message, "kind": type(exc).__name__, **exc.context})
            raise SystemExit(EXIT_USER_ERROR) from None
        fail(str(exc), EXIT_USER_ERROR)
    except NovacronError as exc:
        if as_json:
            emit_json({"error": exc.message, "kind": type(exc).__name__, **exc.context})
            raise SystemExit(EXIT_FAILURE) from None
        fail(str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
