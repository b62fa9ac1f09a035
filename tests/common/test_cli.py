"""The commands' error path: a user error is one line, ``PROG: error: MESSAGE``, status 2."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from apex_dqn.common.checkpoint import CheckpointError
from apex_dqn.common.cli import EXIT_USER_ERROR, CommandError, fail, run_command
from apex_dqn.common.config import ConfigError
from apex_dqn.common.video import VideoError


def raising(exc: BaseException):
    def body(argv: list[str] | None) -> None:
        raise exc

    return body


def test_the_body_gets_argv_and_its_status_is_returned():
    seen: list[list[str] | None] = []

    def body(argv: list[str] | None) -> int:
        seen.append(argv)
        return 3

    assert run_command("prog", body, ["--x", "1"]) == 3
    assert seen == [["--x", "1"]]
    assert run_command("prog", lambda argv: None, []) == 0


@pytest.mark.parametrize(
    "exc",
    [
        CommandError("--episodes=0 is invalid"),
        ConfigError("--lr=-1 is invalid"),
        CheckpointError("checkpoint x.pt does not exist"),
        VideoError("cannot write 'a.avi'"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_user_errors_are_one_line_and_status_2(exc, capsys):
    assert run_command("apex-dqn-x", raising(exc)) == EXIT_USER_ERROR == 2
    captured = capsys.readouterr()
    assert captured.err == f"apex-dqn-x: error: {exc}\n"
    assert captured.out == ""


def test_a_subclass_of_command_error_is_a_user_error(capsys):
    class PlotLikeError(CommandError):
        pass

    assert run_command("p", raising(PlotLikeError("no scalars"))) == 2
    assert capsys.readouterr().err == "p: error: no scalars\n"


def test_a_message_of_several_lines_is_printed_on_one(capsys):
    exc = CheckpointError("checkpoint c.pt is unreadable (UnpicklingError:\n  bad data\n)")
    assert run_command("p", raising(exc)) == 2
    err = capsys.readouterr().err
    assert err == "p: error: checkpoint c.pt is unreadable (UnpicklingError: bad data )\n"
    assert run_command("p", raising(CommandError())) == 2
    assert capsys.readouterr().err == "p: error: CommandError\n"


def test_other_errors_keep_their_traceback():
    with pytest.raises(ValueError, match="a bug"):
        run_command("p", raising(ValueError("a bug")))


def test_argparse_exits_pass_through(capsys):
    def body(argv: list[str] | None) -> None:
        parser = argparse.ArgumentParser(prog="p")
        parser.add_argument("--n", type=int)
        parser.parse_args(argv)

    with pytest.raises(SystemExit) as info:
        run_command("p", body, ["--n", "many"])
    assert info.value.code == 2
    assert "p: error: argument --n: invalid int value" in capsys.readouterr().err


def test_fail_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        fail("apex-dqn", "no GPU here")
    assert info.value.code == 2
    assert capsys.readouterr().err == "apex-dqn: error: no GPU here\n"


def test_the_error_path_imports_nothing_heavy():
    """Recognising the checkpoint's error must not import it (and torch with it)."""
    code = (
        "import sys\n"
        "from apex_dqn.common import cli\n"
        "assert cli.run_command('p', lambda a: 5) == 5\n"
        "print(sorted(m for m in ('torch', 'apex_dqn.common.checkpoint') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
