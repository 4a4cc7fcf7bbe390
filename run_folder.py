"""The life of --dump_path, the folder a run writes: refused when it is not ours to replace, locked while
a run uses it, replaced (with --force) only once everything that can fail before training has passed.

Two promises hold here:
- A failed start loses nothing: train.py builds and checks everything first, and only then calls
  `prepare`, which is the first thing that writes.
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

# Names a run writes in --dump_path (distiller.py's checkpoints, training state, save_pretrained files, model
# card and tensorboard folder; train.py's parameters.json and git_log.json; what tokenizers save). --force
# replaces a folder that holds nothing else.
RUN_FILE_PATTERNS = (
    "parameters.json", "git_log.json", "config.json", "generation_config.json", "README.md", "log",
    "checkpoint.pth", "model_epoch_*.pth", "pytorch_model.bin", "training_state.pth",
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "*.model", "chat_template.jinja", "chat_template.json",
    f"{TMP_PREFIX}*{TMP_SUFFIX}",  # temporaries of writes a kill interrupted
)


def foreign_entries(folder: Path, extra_names: Collection[str] = ()) -> list[str]:
    """The names in `folder` that no run writes (see RUN_FILE_PATTERNS; `extra_names`: this run's tokenizer files)."""
    return sorted(
        entry.name for entry in folder.iterdir()
        if entry.name not in extra_names and not any(fnmatch.fnmatchcase(entry.name, p) for p in RUN_FILE_PATTERNS)
    )


def check_replaceable(args: Namespace, extra_names: Collection[str] = ()) -> None:
    """Refuse an existing --dump_path without --force, and with it anything but a previous run's folder.

    With --force the folder may be empty or hold a previous run's files; anything else (a source tree, a
    .git, files of the user's) is refused, as is a --force that would delete the run's own inputs.
    """
    dump_path = Path(args.dump_path)
    if not dump_path.exists():
        return
    if not dump_path.is_dir():
        raise UserError(f"--dump_path {args.dump_path!r} is a file, not a folder; pick another --dump_path")
    if not args.force:
        raise UserError(f"--dump_path {args.dump_path!r} already exists; pass --force to replace it")
    resolved_dump = dump_path.resolve()
    inputs = (
        args.data_file, args.token_counts, args.student_config, args.student_pretrained_weights, args.teacher_name,
        args.eval_data_file,
    )
    for path in filter(None, inputs):
        resolved = Path(path).resolve()
        if resolved == resolved_dump or resolved_dump in resolved.parents or resolved in resolved_dump.parents:
            raise UserError(f"--force would delete {path!r} together with --dump_path {args.dump_path!r}; pick another")
    foreign = foreign_entries(dump_path, extra_names)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(
            f"--force replaces only a previous run's folder, but --dump_path {args.dump_path!r} also holds {shown}; "
            "pick another --dump_path or move those away"
        )


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


def prepare(args: Namespace, lock: RunFolderLock, extra_names: Collection[str] = ()) -> None:
    """Create (with --force: replace) --dump_path under its lock and write parameters.json and git_log.json.

    Called once every check has passed. The folder's state is judged again under the lock: another run
    may have created or filled it since the early check. With --resume everything stays; only the
    temporaries of writes a kill interrupted are deleted.

    Raises:
        UserError: the folder is in use, or (re)appeared with contents that this run may not replace.
        WriteError: the folder cannot be created.
    """
    dump_path = Path(args.dump_path)
    if args.resume:
        removed = remove_stale_temporaries(dump_path)
        if removed:
            logger.info(f"Removed the temporaries of interrupted writes: {removed}")
        logger.info(f"Resuming the run in {dump_path}")
        return
    with reported_as_write_error(dump_path):
        dump_path.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    if any(dump_path.iterdir()):
        check_replaceable(args, extra_names)
        logger.info(f"--force: replacing the contents of the existing {dump_path}")
        for entry in dump_path.iterdir():  # emptied, not removed: the lock is on the folder
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    logger.info(f"Experiment will be dumped and logged in {dump_path}")
    write_json(dump_path / "parameters.json", vars(args))
    git_log(dump_path)
