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

from token_data import TokenDataError

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - PID: %(process)d - %(message)s"
LOG_DATE_FORMAT = "%m/%d/%Y %H:%M:%S"


class ScriptError(Exception):
    """A problem with the user's input: printed as one line, exit status 1."""


# For errors about a hub name: without a network, huggingface_hub retries for minutes before failing.
HUB_OFFLINE_HINT = "on a machine without network, HF_HUB_OFFLINE=1 makes this fail at once"


def run_cli(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a script's `main` with logging set up; a ScriptError or TokenDataError becomes `error: ...` and exit 1."""
    logging.basicConfig(format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, level=logging.INFO)
    try:
        main(argv)
    except (ScriptError, TokenDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def _new_file_mode() -> int:
    """The mode a file created with open() gets under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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
    new files or all the previous ones, never a mix, and no partial or temporary file. Any OSError
    (a full disk, a folder not writable) becomes one ScriptError naming the file.
    """
    targets, tmps = [Path(path) for path in paths], []
    current = targets[0]  # the file an error is about
    try:
        for current in targets:
            if not current.parent.is_dir():
                raise ScriptError(f"output folder {str(current.parent)!r} does not exist")
            tmps.append(_temporary_beside(current))
        current = targets[0]
        yield tmps
        for current, tmp in zip(targets, tmps):
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        for current, tmp in zip(targets, tmps):
            os.replace(tmp, current)
    except OSError as err:
        raise ScriptError(f"could not write {str(current)!r}: {err.strerror or err}") from err
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def _temporary_beside(target: Path) -> Path:
    """A new empty file in the folder of `target`, with the mode open() would give it."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(_new_file_mode())  # mkstemp makes it owner-only
    return tmp


def bounded_map(executor: Executor, fn: Callable, items: Iterable, depth: int) -> Iterator:
    """`executor.map` that keeps at most `depth` items in flight, so a huge input is never all in memory."""
    pending: deque[Future] = deque()
    for item in items:
        if len(pending) == depth:
            yield pending.popleft().result()
        pending.append(executor.submit(fn, item))
    while pending:
        yield pending.popleft().result()
