""".ci/run leaves nothing in the temporary folder, however its tests end.

It is run for real, with a stand-in `python3.11` first on PATH: `-m venv DIR` makes DIR/bin/python,
which accepts the pip installs and plays pytest (exit status from $PYTEST_STATUS, or waiting to be
killed), so that nothing is installed and no test runs twice.
"""

import os
import signal
import subprocess
import time
from contextlib import suppress
from pathlib import Path

import pytest

STAND_IN_PYTHON = """#!/usr/bin/env bash
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin" && cp "$0.venv" "$3/bin/python" && head -c 100000 /dev/zero > "$3/bin/weights"
    exit 0
fi
exit 99
"""
STAND_IN_VENV_PYTHON = """#!/usr/bin/env bash
case "$2" in
    pip) exit 0 ;;
    pytest) touch "$PYTEST_STARTED"; [ "$PYTEST_STATUS" = wait ] && sleep 60; exit "$PYTEST_STATUS" ;;
esac
exit 98
"""


def start_ci(repo_root: Path, tmp_path: Path, pytest_status: str) -> tuple[subprocess.Popen, Path, Path]:
    """Start .ci/run under the stand-ins; (process, its temporary folder, the file pytest touches)."""
    bin_dir, scratch = tmp_path / "bin", tmp_path / "tmp"
    bin_dir.mkdir()
    scratch.mkdir()
    for name, text in (("python3.11", STAND_IN_PYTHON), ("python3.11.venv", STAND_IN_VENV_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    started = tmp_path / "pytest_started"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(scratch),
           "PYTEST_STATUS": pytest_status, "PYTEST_STARTED": str(started)}
    process = subprocess.Popen([str(repo_root / ".ci" / "run")], env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, scratch, started


@pytest.mark.parametrize("pytest_status", ["0", "3"])
def test_ci_removes_its_environment_and_keeps_the_tests_exit_status(repo_root, tmp_path, pytest_status):
    process, scratch, started = start_ci(repo_root, tmp_path, pytest_status)
    _, stderr = process.communicate(timeout=60)
    assert started.exists(), stderr
    assert process.returncode == int(pytest_status), stderr
    assert list(scratch.iterdir()) == []


def test_ci_removes_its_environment_when_stopped(repo_root, tmp_path):
    """SIGTERM to the whole process group, as a CI runner cancelling the job (or Ctrl-C, SIGINT) sends it."""
    process, scratch, started = start_ci(repo_root, tmp_path, "wait")
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists() and list(scratch.iterdir()) != []  # the environment is there while it runs
        os.killpg(process.pid, signal.SIGTERM)
        process.communicate(timeout=30)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143
    assert list(scratch.iterdir()) == []
