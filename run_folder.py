"""The life of a run folder (train.py's --dump_path, quickstart.py's --output_dir): refused when it is not
ours to replace, locked while a run uses it, replaced (with --force) only once everything that can fail
before training has passed.

Three promises hold here:
- A run folder is recognised by its marker, `.distillation-run.json`, written when the folder is created
  (the run's identity: which command, an id, when). --force replaces an empty folder or one with a valid
  marker of the same command; a folder from before markers only if it holds a run's own records
  (train.py: `parameters.json` and `log/`) and nothing but a run's files, with a warning. Model files
  alone never make a folder replaceable.
- A failed start loses nothing: --force sets the previous run aside with one atomic rename of the whole
  folder to the sibling `<folder>.previous-run`, and deletes it (never following a symlink) only once the
  new run has saved its first training state. A failure before that renames it back, first thing; a run
  killed before that leaves the sibling, which `recover` puts back at the next start. At no moment is the
  previous run split between two places.
- What to do with the folder is decided while holding its lock, so two runs started at once into one
  folder cannot both use it: one trains, the other stops with one line and changes nothing.
"""

import fcntl
import fnmatch
import os
import time
import uuid
from argparse import Namespace
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from scripts.file_safety import delete_own, read_json_object
from training_state import TRAINING_STATE
from utils import TMP_PREFIX, TMP_SUFFIX, UserError, git_log, logger, remove_stale_temporaries, reported_as_write_error, write_json

MARKER = ".distillation-run.json"
MARKER_FORMAT = 1
SET_ASIDE_SUFFIX = ".previous-run"  # the sibling of a run folder where --force keeps the previous run
TRAIN_RUN = "train.py"
# Names a run writes in --dump_path (distiller.py's checkpoints, training state, save_pretrained files, model
# card and tensorboard folder; train.py's parameters.json and git_log.json; what tokenizers save): a folder
# from before markers is replaced only if it holds nothing else.
RUN_FILE_PATTERNS = (
    "parameters.json", "git_log.json", "config.json", "generation_config.json", "README.md", "log",
    "checkpoint.pth", "model_epoch_*.pth", "pytorch_model.bin", "training_state.pth", "training_state.shards.*",
    "data_fingerprint.json",
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "*.model", "chat_template.jinja", "chat_template.json",
    f"{TMP_PREFIX}*{TMP_SUFFIX}",  # temporaries of writes a kill interrupted
    ".previous-run",  # where earlier versions set a previous run aside, inside the folder
)
RUN_RECORDS = ("parameters.json", "log")  # what only a run writes: a folder from before markers needs them


def set_aside_path(folder: Path) -> Path:
    """`<folder>.previous-run`, beside `folder`."""
    return folder.with_name(folder.name + SET_ASIDE_SUFFIX)


def write_marker(folder: Path, kind: str) -> None:
    """Mark `folder` as made by a run of `kind` (e.g. "train.py", "quickstart.py")."""
    write_json(folder / MARKER, {"format": MARKER_FORMAT, "kind": kind, "run_id": uuid.uuid4().hex,
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def has_valid_marker(folder: Path, kind: str) -> bool:
    """Whether `folder` holds a marker, a JSON object naming `kind`, written by `write_marker`."""
    marker = folder / MARKER
    if not marker.is_file() or marker.is_symlink():
        return False
    try:
        content = read_json_object(marker, {"kind": str, "run_id": str, "format": int})
    except UserError:
        return False
    return content.get("kind") == kind and isinstance(content.get("run_id"), str)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_force_target(
    folder: Path, force: bool, flag: str, kind: str, patterns: Collection[str], records: Collection[str],
    extra_names: Collection[str] = (), force_flag: str = "--force",
) -> bool:
    """Whether `folder` exists; if it does, refuse it unless --force is given and it is a run folder of `kind`:
    empty, or with a valid marker, or (from before markers) holding every one of `records` and only
    entries that match `patterns` or are `extra_names`. Never a file, a source tree, a model folder.

    Raises:
        UserError: naming the problem, and what was found (the first five names).
    """
    if not os.path.lexists(folder):
        return False
    if not folder.is_dir():
        raise UserError(f"{flag} {str(folder)!r} is a file, not a folder; pick another {flag}")
    if not force:
        raise UserError(f"{flag} {str(folder)!r} already exists; pass {force_flag} to replace it")
    entries = sorted(entry.name for entry in folder.iterdir())
    if not entries or has_valid_marker(folder, kind):
        return True
    foreign = [
        name for name in entries if name not in extra_names and not any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]
    missing = [name for name in records if name not in entries]
    if foreign or missing:
        found = f"also holds {_shown(foreign)}" if foreign else f"lacks a run's {' and '.join(missing)}"
        raise UserError(
            f"{force_flag} replaces only a previous run's folder (one holding {MARKER}), but {flag} {str(folder)!r} has "
            f"no marker and {found}; pick another {flag} or move those away"
        )
    logger.warning(f"{flag} {str(folder)!r} has no {MARKER}: replacing it as a run from before markers (it holds "
                   f"{' and '.join(records)} and only a run's files)")
    return True


def check_replaceable(args: Namespace, extra_names: Collection[str] = ()) -> None:
    """Refuse an existing --dump_path without --force, and with it anything but a previous run's folder
    (`check_force_target`). (sanity_checks refuses a --dump_path holding an input.)"""
    check_force_target(
        Path(args.dump_path), args.force, "--dump_path", TRAIN_RUN, RUN_FILE_PATTERNS, RUN_RECORDS, extra_names
    )


class RunFolderLock:
    """An exclusive flock on the --dump_path folder, held from `acquire` until `release` (or the run's end).

    Two runs writing the same checkpoints (a job requeued while the first still runs, a command started
    twice) would corrupt both. The lock is flock on the folder itself: nothing is written into it, and
    the kernel drops it when its holder ends, however it ends (kill -9 included), so a lock never
    outlives its run. On a filesystem without locks a warning says the folder is unguarded.
    """

    def __init__(self, dump_path: str | os.PathLike, flag: str = "--dump_path"):
        self.dump_path = str(dump_path)
        self.flag = flag
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (nothing happens if this run holds it already).

        Raises:
            UserError: another live run holds the folder.
        """
        if self.fd is not None:
            return
        fd = os.open(self.dump_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{self.flag} {self.dump_path!r} is in use by another run that is still going; wait for it to end "
                "or stop it"
            ) from None
        except OSError as err:
            logger.warning(f"Could not lock {self.flag} {self.dump_path!r} ({err}): nothing stops a second run "
                           "writing there")
        self.fd = fd

    def hand_over(self) -> int | None:
        """Give up the lock's descriptor to the caller (who closes it) without dropping the lock."""
        fd, self.fd = self.fd, None
        return fd

    def release(self) -> None:
        """Drop the lock, if held."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunFolderLock":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class PreviousRun:
    """The previous run that --force replaces, renamed whole to `<folder>.previous-run` until the new run
    proves itself: `discard` once it saves its first training state, `restore` if it fails before.

    It keeps the set-aside folder locked (the lock's descriptor follows the renamed folder).
    """

    def __init__(self, folder: Path, lock_fd: int | None = None):
        self.folder = folder
        self.set_aside = set_aside_path(folder)
        self.lock_fd = lock_fd

    def move_aside(self) -> None:
        """One rename of the whole folder to its sibling: the previous run is in one place or the other."""
        if os.path.lexists(self.set_aside):
            raise UserError(f"{str(self.set_aside)!r} exists, and is not a run set aside by --force; move it away")
        os.rename(self.folder, self.set_aside)

    def discard(self) -> None:
        """Delete the previous run: the new one has saved its first training state (idempotent)."""
        if self.set_aside.is_dir() and not self.set_aside.is_symlink():
            delete_own(self.set_aside)
            logger.info(f"--force: deleted the previous run that was set aside in {self.set_aside}")
        self._release()

    def restore(self) -> None:
        """Put the previous run back as it was, in two renames, then delete what the new run wrote (idempotent)."""
        try:
            if not self.set_aside.is_dir() or self.set_aside.is_symlink():
                return
            _put_back(self.set_aside, self.folder)
        except OSError as err:
            logger.warning(f"Could not put the previous run back in {self.folder} ({err}): it is whole in "
                           f"{self.set_aside}; the next --force puts it back")
            return
        finally:
            self._release()
        logger.warning(f"The run failed before its first checkpoint: the previous run in {self.folder} is back as it was")

    def _release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def _put_back(set_aside: Path, folder: Path) -> None:
    """Rename `set_aside` to `folder`, moving the failed run's folder out of the way first (deleted after)."""
    failed = folder.with_name(f"{TMP_PREFIX}{folder.name}.failed-run{TMP_SUFFIX}")
    if os.path.lexists(folder):
        os.rename(folder, failed)
    os.rename(set_aside, folder)
    if failed.is_dir() and not failed.is_symlink():
        delete_own(failed, ignore_errors=True)


def recover(folder: Path, kind: str, done_file: str) -> bool:
    """Deal with what a run killed between setting its previous run aside and saving `done_file` (train.py's
    training state) left: put the previous run back when the killed run's folder lacks `done_file`, else
    delete the set-aside run. Returns whether anything changed.

    Raises:
        UserError: the sibling is a link or a file (nothing --force made), or the folder beside it is not a run's.
    """
    set_aside = set_aside_path(folder)
    if not os.path.lexists(set_aside):
        return False
    if set_aside.is_symlink() or not set_aside.is_dir():
        raise UserError(f"{str(set_aside)!r} is a link or a file, not a run set aside by --force; move it away")
    if os.path.lexists(folder) and folder.is_dir() and (folder / done_file).is_file():
        delete_own(set_aside)
        logger.info(f"Deleted {set_aside}: the run that replaced it had saved its {done_file}")
        return True
    if os.path.lexists(folder) and any(folder.iterdir()) and not has_valid_marker(folder, kind):
        raise UserError(
            f"{str(set_aside)!r} holds a run set aside by --force, and {str(folder)!r} is not a run's folder; move one "
            "of them away"
        )
    _put_back(set_aside, folder)
    logger.warning(f"A run killed before its {done_file} had set the previous run aside: it is back in {folder}")
    return True


def create_run_folder(folder: Path, kind: str, lock: "RunFolderLock") -> PreviousRun | None:
    """Create `folder` (marked, locked); an existing one, which the caller has checked under `lock` (and
    `recover`ed), is first set aside.

    Returns:
        The previous run set aside (the caller discards or restores it), or None.

    Raises:
        WriteError: the folder cannot be created or set aside.
    """
    previous_run = None
    with reported_as_write_error(folder):
        if folder.is_dir() and any(folder.iterdir()):
            lock.acquire()
            previous_run = PreviousRun(folder, lock.hand_over())
            previous_run.move_aside()
            logger.info(f"--force: the previous run in {folder} is set aside in {previous_run.set_aside} until this "
                        "one saves a training state")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            write_marker(folder, kind)
        except BaseException:
            if previous_run is not None:
                previous_run.restore()
            raise
    return previous_run


@contextmanager
def run_folder_session(folder: Path, kind: str, done_file: str, check: Callable[[], None], flag: str) -> Iterator[None]:
    """Hold `folder` for a whole run of `kind` (quickstart.py, the task scripts) whose last write is `done_file`.

    Locked throughout; what a killed run left beside it put right first (`recover`); checked again under the
    lock (`check`: may this run replace it?); created with its marker, a previous run set aside whole (one
    rename). If the block fails, the previous run is put back, first thing; if it completes, the previous run
    is deleted.

    Raises:
        UserError: from `check`, or the folder is in use; WriteError: it cannot be created or set aside.
    """
    with RunFolderLock(folder, flag) as lock:
        with reported_as_write_error(folder):
            recover(folder, kind, done_file)
        if folder.is_dir():
            lock.acquire()
            check()
        previous_run = create_run_folder(folder, kind, lock)
        try:
            yield
        except BaseException:
            if previous_run is not None:
                previous_run.restore()
            raise
        if previous_run is not None:
            previous_run.discard()


def prepare(
    args: Namespace, lock: RunFolderLock, extra_names: Collection[str] = (), records: Mapping[str, object] = {}
) -> PreviousRun | None:
    """Create (with --force: take over) --dump_path under its lock and write its marker, parameters.json,
    git_log.json and `records` ({file name: JSON content}, e.g. the data's fingerprints).

    Called once every check has passed. What a killed run left beside the folder is dealt with first
    (`recover`), and the folder's state is judged again under the lock: another run may have created or
    filled it since the early check. With --resume everything stays; only the temporaries of writes a kill
    interrupted are deleted.

    Returns:
        The previous run that --force set aside (the caller discards or restores it), or None.

    Raises:
        UserError: the folder is in use, or (re)appeared with contents that this run may not replace.
        WriteError: the folder cannot be created or its previous run set aside.
    """
    dump_path = Path(args.dump_path).resolve()  # a link to a folder: the folder is set aside, not the link
    with reported_as_write_error(dump_path):
        if recover(dump_path, TRAIN_RUN, TRAINING_STATE):
            lock.release()  # it was on the folder recover replaced
        if args.resume:
            removed = remove_stale_temporaries(dump_path)
            if removed:
                logger.info(f"Removed the temporaries of interrupted writes: {removed}")
            logger.info(f"Resuming the run in {dump_path}")
            return None
    if dump_path.is_dir():
        lock.acquire()
        check_replaceable(args, extra_names)
    previous_run = create_run_folder(dump_path, TRAIN_RUN, lock)
    logger.info(f"Experiment will be dumped and logged in {dump_path}")
    try:
        write_json(dump_path / "parameters.json", vars(args))
        for name, content in records.items():
            write_json(dump_path / name, content)
        git_log(dump_path)
    except BaseException:
        if previous_run is not None:
            previous_run.restore()
        raise
    return previous_run
