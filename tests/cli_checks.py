"""Assertions shared by the tests that drive the command-line tools: one-line errors, train.main in-process."""

import subprocess

import train


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A script failed with a non-zero exit, no traceback, and a last line `error: ...` naming `fragments`."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in last


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """train.main in this process: (exit status, stderr)."""
    try:
        train.main(argv)
    except SystemExit as exit_info:
        return exit_info.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def error_line(stderr: str) -> str:
    """The single `error: ...` line of a failed run (and no traceback)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]
