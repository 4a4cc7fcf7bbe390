"""A command-line tool with a fault injected at a chosen moment, for the tests of interrupted runs; the
mechanism lives here, not in the production code.

    FAULT=<fault> python tests/fault_injection.py <train.py flags>       (also under torchrun)
    FAULT=<fault> FAULT_TOOL=<path of a tool> python tests/fault_injection.py <its flags>

with the repo root and tests/ on PYTHONPATH (FAULT_TOOL: scripts/ too). FAULT is one of:
- `sigterm@N` / `sighup@N` / `sigkill@N`: after iteration N the process sends itself SIGTERM or SIGHUP
  (the run stops at the next optimizer step, training state saved) or SIGKILL (it dies there and then);
- `sigkill@step=N`, any tool: the process kills itself right after its N-th AdamW step (the task scripts);
- `<kind>@move=NAME#K`, any tool: just before the K-th rename of the process onto a path named NAME
  (os.replace or os.rename: an atomic write landing, a run folder set aside or put back), `kill9`, `sigterm` or `sighup` sends itself
  that signal, `full` makes this rename and every later write fail as on a full disk (ENOSPC, then
  RLIMIT_FSIZE 0), `readonly` makes
  the target's folder read-only (chmod, or `chattr +i` for root; its path is appended to FAULT_RECORD
  for the test to undo);
- `pause@NAME#K`: the K-th atomic write of NAME in --dump_path writes half its temporary file,
  creates NAME.paused beside it and sleeps, waiting to be killed in the middle of the write.
A `:R` suffix limits the fault to the process of global rank R (RANK; 0 without a launcher).
"""

import errno
import os
import resource
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

SIGNALS = {"sigterm": signal.SIGTERM, "sighup": signal.SIGHUP, "sigkill": signal.SIGKILL, "sigstop": signal.SIGSTOP}
MOVE_FAULTS = ("kill9", "sigterm", "sighup", "full", "readonly")


def make_read_only(folder: Path) -> None:
    """Make `folder` refuse new entries and renames, for root too, and record it for the test to undo."""
    with open(os.environ["FAULT_RECORD"], "a", encoding="utf-8") as record:
        record.write(f"{folder}\n")
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o555)


def strike(kind: str, target: Path) -> None:
    """Apply fault `kind` now; `target` is the path about to be renamed over."""
    if kind == "kill9":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind in ("sigterm", "sighup"):
        os.kill(os.getpid(), SIGNALS[kind])
    elif kind == "full":  # this write, and every later one, fails as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    elif kind == "readonly":
        make_read_only(target.parent)


def fault_before_move(kind: str, name: str, occurrence: int) -> None:
    """Make fault `kind` strike just before the `occurrence`-th os.replace or os.rename onto a path named `name`."""
    moves = {"seen": 0}

    def wrap(original):
        def move(src, dst, *args, **kwargs):
            target = Path(os.fsdecode(dst))
            moves["seen"] += target.name == name
            if target.name == name and moves["seen"] == occurrence:
                strike(kind, target)
            return original(src, dst, *args, **kwargs)

        return move

    os.replace, os.rename = wrap(os.replace), wrap(os.rename)


def signal_after_iteration(signum: int, iteration: int) -> None:
    """Make the process send itself `signum` right after micro-batch `iteration`."""
    import distiller

    original_step = distiller.Distiller.step

    def step(self, *args, **kwargs):
        original_step(self, *args, **kwargs)
        if self.n_total_iter == iteration:
            os.kill(os.getpid(), signum)

    distiller.Distiller.step = step


def signal_after_optimizer_step(signum: int, n_steps: int) -> None:
    """Make the process send itself `signum` right after its `n_steps`-th AdamW step."""
    import torch

    original_step = torch.optim.AdamW.step
    steps = []

    def step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == n_steps:
            os.kill(os.getpid(), signum)
        return result

    torch.optim.AdamW.step = step


def pause_in_write(name: str, occurrence: int) -> None:
    """Make the `occurrence`-th atomic write of `name` stop halfway and wait to be killed."""
    import checkpointing

    original_write = checkpointing.atomic_write
    seen = []

    def atomic_write(path, write):
        path = Path(path)
        if path.name == name:
            seen.append(path)
            if len(seen) == occurrence:
                def half_write(tmp: Path) -> None:
                    write(tmp)
                    tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
                    (path.parent / f"{name}.paused").touch()
                    time.sleep(3600)

                return original_write(path, half_write)
        return original_write(path, write)

    checkpointing.atomic_write = atomic_write


def install(fault: str) -> None:
    """Apply FAULT (see the module docstring), if it concerns this process."""
    fault, _, rank = fault.partition(":")
    if rank and int(rank) != int(os.environ.get("RANK", "0")):
        return
    kind, _, where = fault.partition("@")
    if kind in MOVE_FAULTS and where.startswith("move="):
        name, _, occurrence = where.removeprefix("move=").rpartition("#")
        fault_before_move(kind, name, int(occurrence))
    elif kind in SIGNALS and where.startswith("step="):
        signal_after_optimizer_step(SIGNALS[kind], int(where.removeprefix("step=")))
    elif kind in SIGNALS:
        signal_after_iteration(SIGNALS[kind], int(where))
    elif kind == "pause":
        name, _, occurrence = where.partition("#")
        pause_in_write(name, int(occurrence))
    else:
        raise ValueError(f"unknown FAULT {fault!r}")


if __name__ == "__main__":
    install(os.environ["FAULT"])
    tool = os.environ.get("FAULT_TOOL")
    if tool:
        sys.argv = [tool, *sys.argv[1:]]
        runpy.run_path(tool, run_name="__main__")
    else:
        import train

        train.main(sys.argv[1:])
