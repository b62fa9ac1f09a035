"""The commands' one error path: a user error ends a command in one line, with status 2.

A command (``apex-dqn``, ``apex-dqn-evaluate``, ``apex-dqn-play``, ``apex-dqn-plot``)
given something it cannot use (a missing checkpoint, an invalid option, a video type it
cannot write) says so in one line on stderr, ``PROG: error: MESSAGE``, and exits with
status 2: the form and the status argparse uses for a bad command line, so a script
sees one convention for every mistake of its caller. A traceback is kept for bugs.

* :class:`CommandError`: raise it, or a subclass, for a user error.
* :func:`run_command` ``(prog, body, argv)``: run a command's body and turn a user error
  into the one line; returns the exit status, for ``sys.exit``.
* :func:`fail` ``(prog, message)``: report a user error and exit at once, where no body
  is running (say, while preparing one).

The user errors of modules that do not depend on this one (:data:`USER_ERRORS`: config,
checkpoint and video errors) count as well. They are looked up only among the modules
already imported: an exception can only be raised once its class's module has been,
so nothing needs importing to recognise it (the checkpoint module would bring in torch).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_USER_ERROR = 2  # argparse's status for a bad command line

# (module, class) of the user errors raised outside the commands.
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("apex_dqn.common.config", "ConfigError"),
    ("apex_dqn.common.checkpoint", "CheckpointError"),
    ("apex_dqn.common.video", "VideoError"),
)

# A command's body: parses ``argv`` (None: ``sys.argv[1:]``), does the work, and returns
# its exit status (None: 0).
Body = Callable[[list[str] | None], "int | None"]


class CommandError(RuntimeError):
    """A user error: the command ends with ``PROG: error: MESSAGE`` and exit status 2."""


def user_error_types() -> tuple[type[Exception], ...]:
    """:class:`CommandError` and the :data:`USER_ERRORS` whose modules are imported."""
    found: list[type[Exception]] = [CommandError]
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None:
            found.append(getattr(module, class_name))
    return tuple(found)


def one_line(message: str) -> str:
    """``message`` on one line (its lines joined by spaces), never empty."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip()) or "failed"


def report(prog: str, message: str) -> None:
    """Print ``PROG: error: MESSAGE`` on stderr, on one line."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)


def fail(prog: str, message: str) -> NoReturn:
    """Report a user error and exit with status 2."""
    report(prog, message)
    sys.exit(EXIT_USER_ERROR)


def run_command(prog: str, body: Body, argv: list[str] | None = None) -> int:
    """Run ``body(argv)``; a user error becomes one line on stderr and status 2.

    Returns the body's status (0 when it returns None). Other exceptions propagate with
    their traceback; ``SystemExit`` (argparse's own errors and ``--help``) passes through.
    """
    try:
        status = body(argv)
    # The tuple is built when an exception arrives, so it sees every module imported by then.
    except user_error_types() as exc:
        report(prog, str(exc) or type(exc).__name__)
        return EXIT_USER_ERROR
    return 0 if status is None else int(status)
