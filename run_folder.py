"""The life of --dump_path, the folder a run writes: refused when it is not ours to replace, locked while
a run uses it, replaced (with --force) only once everything that can fail before training has passed.

Two promises hold here:
- A failed start loses nothing: train.py builds and checks everything first, and only then calls
  `prepare`, which is the first thing that writes. With --force, even a run that fails after that
  (a loss that overflows in the first steps, a crash, a Ctrl-C) gives the previous run back: its
  files are set aside, not deleted, until the new run writes its first checkpoint.
- What to do with the folder is decided while holding its lock, so two runs started at once into one
  folder cannot both use it: one trains, the other stops with one line and changes nothing.
"""

import fcntl
import fnmatch
import os
import shutil
from argparse import Namespace
from collections.abc import Collection
from pathlib import Path

from utils import TMP_PREFIX, TMP_SUFFIX, UserError, git_log, logger, remove_stale_temporaries, reported_as_write_error, write_json

# The folder inside --dump_path where --force keeps the previous run until the new one writes a checkpoint.
SET_ASIDE = ".previous-run"
# Names a run writes in --dump_path (distiller.py's checkpoints, training state, save_pretrained files, model
# card and tensorboard folder; train.py's parameters.json and git_log.json; what tokenizers save). --force
# replaces a folder that holds nothing else.
RUN_FILE_PATTERNS = (
    "parameters.json", "git_log.json", "config.json", "generation_config.json", "README.md", "log",
    "checkpoint.pth", "model_epoch_*.pth", "pytorch_model.bin", "training_state.pth", "training_state.shards.*",
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "*.model", "chat_template.jinja", "chat_template.json",
    f"{TMP_PREFIX}*{TMP_SUFFIX}",  # temporaries of writes a kill interrupted
    SET_ASIDE,
)


def check_force_target(
    folder: Path, force: bool, flag: str, patterns: Collection[str], extra_names: Collection[str] = ()
) -> bool:
    """Whether `folder` exists; if it does, refuse it unless --force is given and it holds only entries that
    match `patterns` (or are `extra_names`): never a file, a source tree, a .git or the user's own files.

    Raises:
        UserError: naming the problem, and what was found (the first five names).
    """
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise UserError(f"{flag} {str(folder)!r} is a file, not a folder; pick another {flag}")
    if not force:
        raise UserError(f"{flag} {str(folder)!r} already exists; pass --force to replace it")
    foreign = sorted(
        entry.name for entry in folder.iterdir()
        if entry.name not in extra_names and not any(fnmatch.fnmatchcase(entry.name, p) for p in patterns)
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(
            f"--force replaces only a previous run's folder, but {flag} {str(folder)!r} also holds {shown}; "
            f"pick another {flag} or move those away"
        )
    return True


def check_replaceable(args: Namespace, extra_names: Collection[str] = ()) -> None:
    """Refuse an existing --dump_path without --force, and with it anything but a previous run's folder.

    With --force the folder may be empty or hold a previous run's files; anything else (a source tree, a
    .git, files of the user's) is refused, as is a --force that would delete the run's own inputs.
    """
    dump_path = Path(args.dump_path)
    if args.force and dump_path.is_dir():
        resolved_dump = dump_path.resolve()
        inputs = (
            args.data_file, args.token_counts, args.student_config, args.student_pretrained_weights, args.teacher_name,
            args.eval_data_file,
        )
        for path in filter(None, inputs):
            resolved = Path(path).resolve()
            if resolved == resolved_dump or resolved_dump in resolved.parents or resolved in resolved_dump.parents:
                raise UserError(
                    f"--force would delete {path!r} together with --dump_path {args.dump_path!r}; pick another"
                )
    check_force_target(dump_path, args.force, "--dump_path", RUN_FILE_PATTERNS, extra_names)


class RunFolderLock:
    """An exclusive flock on the --dump_path folder, held from `acquire` until `release` (or the run's end).

    Two runs writing the same checkpoints (a job requeued while the first still runs, a command started
    twice) would corrupt both. The lock is flock on the folder itself: nothing is written into it, and
    the kernel drops it when its holder ends, however it ends (kill -9 included), so a lock never
    outlives its run. On a filesystem without locks a warning says the folder is unguarded.
    """

    def __init__(self, dump_path: str | os.PathLike):
        self.dump_path = str(dump_path)
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
                f"--dump_path {self.dump_path!r} is in use by another run that is still going; wait for it to end "
                "or stop it"
            ) from None
        except OSError as err:
            logger.warning(f"Could not lock --dump_path {self.dump_path!r} ({err}): nothing stops a second run "
                           "writing there")
        self.fd = fd

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
    """The previous run that --force replaces, set aside in `dump_path/.previous-run` until the new run
    proves itself: `discard` once it writes its first checkpoint, `restore` if it fails before.

    Setting aside is a rename per entry, so the restored files are the previous run's, byte for byte.
    A run killed before its first checkpoint leaves the set-aside folder in place: the next --force
    keeps it as the previous run (what lies beside it is the killed run's parameters and logs only).
    """

    def __init__(self, dump_path: Path):
        self.dump_path = dump_path
        self.folder = dump_path / SET_ASIDE

    def set_aside(self) -> None:
        """Move the folder's entries into the set-aside folder, or, if a killed run left one, delete them."""
        if self.folder.is_dir():
            _remove_entries(self.dump_path, keep=SET_ASIDE)
            return
        self.folder.mkdir()
        moved = []
        try:
            for entry in self.dump_path.iterdir():
                if entry.name != SET_ASIDE:
                    entry.rename(self.folder / entry.name)
                    moved.append(entry.name)
        except OSError:
            for name in moved:  # back as it was before raising
                (self.folder / name).rename(self.dump_path / name)
            self.folder.rmdir()
            raise

    def discard(self) -> None:
        """Delete the previous run: the new one is about to write its first checkpoint (idempotent)."""
        if self.folder.is_dir():
            shutil.rmtree(self.folder)
            logger.info(f"--force: deleted the previous run that was set aside in {self.folder}")

    def restore(self) -> None:
        """Put the previous run back as it was, removing what the new run wrote (idempotent)."""
        if not self.folder.is_dir():
            return
        try:
            _remove_entries(self.dump_path, keep=SET_ASIDE)
            for entry in self.folder.iterdir():
                entry.rename(self.dump_path / entry.name)
            self.folder.rmdir()
        except OSError as err:
            logger.warning(f"Could not put the previous run back in {self.dump_path} ({err}): its files are in "
                           f"{self.folder}")
            return
        logger.warning(f"The run failed before its first checkpoint: the previous run in {self.dump_path} is back "
                       "as it was")


def _remove_entries(folder: Path, keep: str) -> None:
    """Delete every entry of `folder` but `keep` (emptied, not removed: the lock is on the folder)."""
    for entry in folder.iterdir():
        if entry.name == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def prepare(args: Namespace, lock: RunFolderLock, extra_names: Collection[str] = ()) -> PreviousRun | None:
    """Create (with --force: take over) --dump_path under its lock and write parameters.json and git_log.json.

    Called once every check has passed. The folder's state is judged again under the lock: another run
    may have created or filled it since the early check. With --resume everything stays; only the
    temporaries of writes a kill interrupted are deleted.

    Returns:
        The previous run that --force set aside (the caller discards or restores it), or None.

    Raises:
        UserError: the folder is in use, or (re)appeared with contents that this run may not replace.
        WriteError: the folder cannot be created or its previous run set aside.
    """
    dump_path = Path(args.dump_path)
    if args.resume:
        removed = remove_stale_temporaries(dump_path)
        if removed:
            logger.info(f"Removed the temporaries of interrupted writes: {removed}")
        logger.info(f"Resuming the run in {dump_path}")
        return None
    with reported_as_write_error(dump_path):
        dump_path.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    previous_run = None
    if any(dump_path.iterdir()):
        check_replaceable(args, extra_names)
        logger.info(f"--force: the previous run in {dump_path} is set aside until this one writes a checkpoint")
        previous_run = PreviousRun(dump_path)
        with reported_as_write_error(previous_run.folder):
            previous_run.set_aside()
    logger.info(f"Experiment will be dumped and logged in {dump_path}")
    write_json(dump_path / "parameters.json", vars(args))
    git_log(dump_path)
    return previous_run
