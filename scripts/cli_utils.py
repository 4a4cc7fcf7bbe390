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


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block completes.

    A crash, an error or a full disk leaves any previous file at `path` untouched and no partial file.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise ScriptError(f"output folder {str(target.parent)!r} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.chmod(_new_file_mode())  # mkstemp makes it owner-only; give it the mode open() would
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as err:
        raise ScriptError(f"could not write {str(target)!r}: {err.strerror or err}") from err
    finally:
        tmp.unlink(missing_ok=True)


def bounded_map(executor: Executor, fn: Callable, items: Iterable, depth: int) -> Iterator:
    """`executor.map` that keeps at most `depth` items in flight, so a huge input is never all in memory."""
    pending: deque[Future] = deque()
    for item in items:
        if len(pending) == depth:
            yield pending.popleft().result()
        pending.append(executor.submit(fn, item))
    while pending:
        yield pending.popleft().result()
