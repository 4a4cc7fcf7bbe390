"""Helpers shared by the tests that drive the command-line tools: one-line errors, train.main in-process,
and the environment and port of child processes."""

import os
import socket
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


def child_env(repo_root) -> dict[str, str]:
    """This environment without launcher or fault variables, the repo and tests/ importable, one thread per process."""
    variables = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "FAULT")}
    variables["PYTHONPATH"] = os.pathsep.join([str(repo_root), str(repo_root / "tests")])
    variables["OMP_NUM_THREADS"] = "1"
    return variables


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
