"""Helpers shared by the tests that drive the command-line tools: one-line errors, train.main in-process
and in a child process, a valid train.py command line per family, and the environment and port of child
processes."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import train

STUDENT_OF = {"bert": "distilbert", "roberta": "roberta", "gpt2": "gpt2"}

# One realistic flag set per family; together they cover every loss term and every freezing flag.
FAMILY_FLAGS = {
    "bert": ["--mlm", "--alpha_ce", "5.0", "--alpha_mlm", "2.0", "--alpha_cos", "1.0", "--alpha_clm", "0.0",
             "--freeze_pos_embs"],
    "roberta": ["--mlm", "--alpha_ce", "1.0", "--alpha_mlm", "1.0", "--alpha_mse", "0.01", "--alpha_clm", "0.0",
                "--restrict_ce_to_mask", "--freeze_pos_embs", "--freeze_token_type_embds"],
    "gpt2": ["--alpha_ce", "1.0", "--alpha_clm", "1.0", "--alpha_cos", "1.0", "--group_by_size", "--freeze_pos_embs"],
}


def base_argv(inputs: dict, kind: str, dump_path) -> list[str]:
    """A valid command line for `kind` (its FAMILY_FLAGS), without run-length flags."""
    argv = [
        "--dump_path", str(dump_path), "--data_file", inputs[kind]["data_file"],
        "--student_type", STUDENT_OF[kind], "--student_config", inputs[kind]["student_config"],
        "--teacher_type", kind, "--teacher_name", inputs[kind]["teacher_name"], *FAMILY_FLAGS[kind],
    ]
    if "--mlm" in FAMILY_FLAGS[kind]:
        argv += ["--token_counts", inputs[kind]["token_counts"]]
    return argv


def with_flags(argv: list[str], flags: dict[str, str | None]) -> list[str]:
    """`argv` with each flag's value replaced (or the flag appended; None = a switch)."""
    argv = list(argv)
    for flag, value in flags.items():
        if flag in argv and value is not None:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag] if value is None else [flag, value]
    return argv


def run_cli(argv: list[str], cwd, **popen_options) -> subprocess.CompletedProcess:
    """`python train.py ...` in a fresh process, from `cwd` (not the repo), without launcher variables.

    One intra-op thread: tiny models gain nothing from more, and it keeps parallel test runs from thrashing.
    `popen_options` go to subprocess.run (e.g. a preexec_fn that limits the process).
    """
    repo = Path(train.__file__).parent
    options = {"env": child_env(repo), **popen_options}
    return subprocess.run([sys.executable, str(repo / "train.py"), *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300, **options)


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
