"""What every command-line script shares: logging, one-line errors, atomic output files and
bounded parallel maps.

Scripts run as `python scripts/<name>.py`, so this module is importable as `cli_utils`
from any of them without touching sys.path.
"""

import logging
import os
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from pathlib import Path

from file_safety import UserError, discard_temporary, reported_write, temporary_beside
from token_data import TokenDataError

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - PID: %(process)d - %(message)s"
LOG_DATE_FORMAT = "%m/%d/%Y %H:%M:%S"


class ScriptError(UserError):
    """A problem with the user's input: printed as one line, exit status 1."""


# For errors about a hub name: without a network, huggingface_hub retries for minutes before failing.
HUB_OFFLINE_HINT = "on a machine without network, HF_HUB_OFFLINE=1 makes this fail at once"


def run_cli(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a script's `main` with logging set up; a UserError (ScriptError...) or TokenDataError becomes `error: ...` and exit 1."""
    logging.basicConfig(format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, level=logging.INFO)
    try:
        main(argv)
    except (UserError, TokenDataError) as err:  # ScriptError, WriteError and file_safety's refusals

        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def check_output_path(flag: str, path: str | os.PathLike, create_folders: bool = False) -> None:
    """Refuse, before any slow work, an output path that cannot be written: its folder missing (unless
    `create_folders`), a file, or a folder this process may not write in.

    The folder is probed by creating a nameless file in it, the only test that holds for root too.
    """
    folder = Path(path).parent
    while create_folders and not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the nearest folder that exists: the ones below it will be created there
    if not folder.exists():
        raise ScriptError(f"{flag} {str(path)!r}: folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ScriptError(f"{flag} {str(path)!r}: {str(folder)!r} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        reason = err.strerror or err
        raise ScriptError(f"{flag} {str(path)!r}: cannot write in folder {str(folder)!r} ({reason})") from err


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block completes.

    A crash, an error or a full disk leaves any previous file at `path` untouched and no partial file.
    """
    with atomic_outputs([path]) as (tmp,):
        yield tmp


@contextmanager
def atomic_outputs(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Yield a temporary path beside each of `paths`; they replace `paths`, all together, only if the block completes.

    Every temporary file is on disk before the first is renamed, so a full disk leaves either all the
    new files or all the previous ones, never a mix, and no partial or temporary file. A failed write
    (a full disk, a folder not writable) becomes one WriteError naming the file (file_safety.reported_write).
    """
    targets, tmps = [Path(path) for path in paths], []
    try:
        for target in targets:
            with reported_write(target):
                if not target.parent.is_dir():
                    raise ScriptError(f"output folder {str(target.parent)!r} does not exist")
                tmps.append(temporary_beside(target))
        with reported_write(targets[0]):
            yield tmps
        for target, tmp in zip(targets, tmps):
            with reported_write(target), open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        for target, tmp in zip(targets, tmps):
            with reported_write(target):
                os.replace(tmp, target)
    finally:
        for tmp in tmps:
            discard_temporary(tmp)


def bounded_map(executor: Executor, fn: Callable, items: Iterable, depth: int) -> Iterator:
    """`executor.map` that keeps at most `depth` items in flight, so a huge input is never all in memory."""
    pending: deque[Future] = deque()
    for item in items:
        if len(pending) == depth:
            yield pending.popleft().result()
        pending.append(executor.submit(fn, item))
    while pending:
        yield pending.popleft().result()
