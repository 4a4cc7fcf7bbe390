"""train.py with a fault injected at a chosen moment, for the tests of interrupted runs; the
mechanism lives here, not in the production code.

    FAULT=<fault> python tests/fault_injection.py <train.py flags>       (also under torchrun)

with the repo root and tests/ on PYTHONPATH. FAULT is one of:
- `sigterm@N` / `sigkill@N`: after iteration N the process sends itself SIGTERM (the run stops at
  the next optimizer step, training state saved) or SIGKILL (it dies there and then);
- `pause@NAME#K`: the K-th atomic write of NAME in --dump_path writes half its temporary file,
  creates NAME.paused beside it and sleeps, waiting to be killed in the middle of the write.
A `:R` suffix limits the fault to the process of global rank R (RANK; 0 without a launcher).
"""

import os
import signal
import sys
import time
from pathlib import Path

import checkpointing
import distiller
import train

SIGNALS = {"sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL, "sigstop": signal.SIGSTOP}


def signal_after_iteration(signum: int, iteration: int) -> None:
    """Make the process send itself `signum` right after micro-batch `iteration`."""
    original_step = distiller.Distiller.step

    def step(self, *args, **kwargs):
        original_step(self, *args, **kwargs)
        if self.n_total_iter == iteration:
            os.kill(os.getpid(), signum)

    distiller.Distiller.step = step


def pause_in_write(name: str, occurrence: int) -> None:
    """Make the `occurrence`-th atomic write of `name` stop halfway and wait to be killed."""
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
    if kind in SIGNALS:
        signal_after_iteration(SIGNALS[kind], int(where))
    elif kind == "pause":
        name, _, occurrence = where.partition("#")
        pause_in_write(name, int(occurrence))
    else:
        raise ValueError(f"unknown FAULT {fault!r}")


if __name__ == "__main__":
    install(os.environ["FAULT"])
    train.main(sys.argv[1:])
