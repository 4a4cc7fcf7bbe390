"""Files handled so that no command loses what the user had: outputs kept apart from inputs, every write
atomic and reported in one line, JSON and text inputs validated before use, sizes bounded before allocating.

Shared by every command-line tool: the scripts import it as `file_safety`, the top-level modules
(train.py, evaluation.py, quickstart.py, the task scripts) as `scripts.file_safety`. It imports the
standard library only. The API:

- `UserError`: a problem with the user's flags or files, printed by every entry point as one `error:` line
  (exit status 1); `WriteError` (also an OSError): an output could not be written.
- `check_outputs_apart(outputs, inputs)`: refuse an output path that equals, contains or lies inside an
  input path, after resolving symlinks. Call it with every output and input flag of a command, first.
- `reported_write(path)`: a context manager turning any failed write in it (OSError, or torch's and
  safetensors' errors carrying one) into `WriteError("could not write PATH: REASON")`.
- `atomic_write(path, write)`: `write(tmp)` on a temporary beside `path`, fsynced and renamed over it;
  `temporary_beside`, `publish`, `discard_temporary` and `remove_stale_temporaries` are its parts.
- `read_json_object(path, fields, what)`: a JSON object whose fields have the given types, else one line
  naming the file and the field; `check_model_folder(path, flag)` applies it (and a UTF-8 check on the
  vocabulary files) to a local model or tokenizer folder before a library reads it.
- `check_fits_in_memory(n_bytes, what, fix)`: refuse an allocation larger than the memory available.
- `bounded_lines(handle, limit)`, `has_text(path)`: stream a text file without ever holding one huge line.
- `fingerprint(path)`: size and hash of a file (sampled blocks for big ones), to recognise it later.
"""

import codecs
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import IO


class UserError(Exception):
    """A problem with the user's flags, files or models: reported as one line, exit status 1."""


class WriteError(UserError, OSError):
    """An output file could not be written (disk full, unwritable folder); the previous file is intact."""


PathLike = str | os.PathLike


def _quoted(path: PathLike) -> str:
    return repr(str(path))


Paths = Mapping[str, PathLike | None] | Iterable[tuple[str, PathLike | None]]


def check_outputs_apart(outputs: Paths, inputs: Paths) -> None:
    """Refuse an output that equals, contains or lies inside an input, symlinks resolved.

    Writing there would replace or delete the input (a teacher overwritten by its own extraction, a corpus
    inside a folder that --force replaces). Inputs that do not exist locally (hub names) are skipped.

    Args:
        outputs, inputs: {flag: path}, e.g. {"--dump_checkpoint": "out.pth"}, or (flag, path) pairs when a
            flag names several files; None values are skipped.

    Raises:
        UserError: naming both flags and paths.
    """
    inputs = list(inputs.items() if isinstance(inputs, Mapping) else inputs)
    for out_flag, output in outputs.items() if isinstance(outputs, Mapping) else outputs:
        if output is None:
            continue
        resolved_out = Path(output).resolve()
        for in_flag, source in inputs:
            if source is None or not os.path.lexists(source):
                continue
            resolved_in = Path(source).resolve()
            if resolved_in == resolved_out:
                relation = "is the same path as"
            elif resolved_out in resolved_in.parents:
                relation = "holds"
            elif resolved_in in resolved_out.parents:
                relation = "lies inside"
            else:
                continue
            raise UserError(
                f"{out_flag} {_quoted(output)} {relation} {in_flag} {_quoted(source)}: writing it could replace or "
                f"delete that input; pick an {out_flag} apart from every input"
            )


@contextmanager
def reported_write(target: PathLike) -> Iterator[None]:
    """Turn a failed write inside the block into one `WriteError` naming `target`.

    A write fails as an OSError (full disk, read-only folder, a file where a folder should be), or, from
    torch.save and safetensors, as a RuntimeError or a SafetensorError carrying the OSError's text.
    """
    try:
        yield
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(f"could not write {_quoted(target)}: {err.strerror or err}") from err
    except Exception as err:
        if not isinstance(err, RuntimeError) and type(err).__name__ != "SafetensorError":
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WriteError(f"could not write {_quoted(target)} (is the disk full?): {reason}") from err


# Temporary names of atomic writes: `.<name>.<random>.tmp` beside the target (files or folders).
TMP_PREFIX, TMP_SUFFIX = ".", ".tmp"


def _new_file_mode() -> int:
    """The mode a file created with open() gets under the current umask (mkstemp makes files owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync(path: Path) -> None:
    """Flush a file or a folder to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_beside(target: PathLike) -> Path:
    """A new empty file `.<name>.<random>.tmp` in the folder of `target`, with the mode open() would give it."""
    target = Path(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{target.name}.", suffix=TMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(_new_file_mode())
    return tmp


def discard_temporary(tmp: Path) -> None:
    """Delete a temporary if it is still there; a folder that refuses it (read-only) keeps it, ignored by readers."""
    with suppress(OSError):
        tmp.unlink(missing_ok=True)


def publish(tmp: Path, target: Path) -> None:
    """Rename the finished file `tmp` to `target` durably: fsync the file, rename, fsync the folder.

    Without the first fsync a power cut can leave `target` renamed but empty; without the second,
    the rename itself may be lost.
    """
    tmp.chmod(_new_file_mode())
    _fsync(tmp)
    os.replace(tmp, target)
    _fsync(target.parent)


def atomic_write(path: PathLike, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it to `path` (fsynced).

    A crash, a kill or an error inside `write` leaves any previous file at `path` untouched and no
    partial file at `path` (a kill may leave the temporary, which `remove_stale_temporaries` deletes).

    Raises:
        WriteError: when the write fails (disk full, unwritable folder), naming `path`.
    """
    target = Path(path)
    with reported_write(target):
        tmp = temporary_beside(target)
        try:
            write(tmp)
            publish(tmp, target)
        finally:
            discard_temporary(tmp)


def delete_own(path: PathLike, ignore_errors: bool = False) -> None:
    """Delete a file or folder this project made (a temporary, a set-aside or superseded run): never through a link.

    A link is only unlinked, never followed; every delete of the project goes through here.
    """
    path = Path(path)
    if path.is_symlink() or path.is_file():
        with suppress(OSError) if ignore_errors else nullcontext():
            path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=ignore_errors)


def remove_stale_temporaries(folder: PathLike) -> list[str]:
    """Delete what interrupted atomic writes left in `folder` (`.*.tmp` files and folders); return their names."""
    removed = []
    for path in Path(folder).iterdir():
        if not (path.name.startswith(TMP_PREFIX) and path.name.endswith(TMP_SUFFIX)):
            continue
        delete_own(path)
        removed.append(path.name)
    return sorted(removed)


JSON_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
                   bool: "true or false", type(None): "null"}


def _type_names(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(JSON_TYPE_NAMES.get(kind, kind.__name__) for kind in types)


def read_json_object(path: PathLike, fields: Mapping[str, type | tuple[type, ...]] = {}, what: str = "") -> dict:
    """The JSON object in `path`, with each of `fields` that is present of the given type(s).

    Args:
        fields: {field: type or tuple of types}; int fields refuse booleans, float fields accept integers.
        what: how the message names the file, e.g. "--resume: the run's parameters.json"; default: its path.

    Raises:
        UserError: the file is unreadable, not UTF-8, not JSON, not an object, or a field has another type;
            one line naming the file and the field.
    """
    name = what or _quoted(path)
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read().decode("utf-8"))
    except OSError as err:
        raise UserError(f"could not read {name}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise UserError(f"{name} is not UTF-8 text (byte {err.start}); it is damaged or not this file") from err
    except ValueError as err:
        raise UserError(f"{name} is not a valid JSON file ({err}); it is damaged or was cut short") from err
    if not isinstance(data, dict):
        raise UserError(f"{name} holds {_type_names(type(data))}, not a JSON object; it is damaged or not this file")
    for field, types in fields.items():
        if field not in data:
            continue
        value, types = data[field], types if isinstance(types, tuple) else (types,)
        accepted = (*types, int) if float in types else types
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in types):
            raise UserError(
                f"{name}: field {field!r} is {_type_names(type(value))} ({str(value)[:40]!r}), expected "
                f"{_type_names(types)}; fix or remove it"
            )
    return data


# What a local model or tokenizer folder holds that libraries read without checking shapes.
MODEL_FOLDER_JSON = {
    "config.json": {"model_type": str, "architectures": (list, type(None)), "vocab_size": (int, type(None)),
                    "num_hidden_layers": (int, type(None)), "hidden_size": (int, type(None)),
                    "n_layer": (int, type(None)), "n_embd": (int, type(None))},
    "tokenizer_config.json": {"model_max_length": (int, float), "tokenizer_class": (str, type(None)),
                              "added_tokens_decoder": dict, "do_lower_case": bool},
    "special_tokens_map.json": {},
    "generation_config.json": {},
    "vocab.json": {},
}
TEXT_VOCABULARIES = ("vocab.txt", "merges.txt")
CHUNK_BYTES = 1 << 20


def check_model_folder(path: PathLike, flag: str) -> None:
    """Refuse a local model or tokenizer folder whose JSON files have the wrong shape, or whose text
    vocabularies are not UTF-8: transformers would fail on them with a traceback, or mid-run.

    A path that is not a local folder (a hub name, a weights file) is left to its loader.

    Raises:
        UserError: naming `flag`, the file and the field.
    """
    folder = Path(path)
    if not folder.is_dir():
        return
    for name, fields in MODEL_FOLDER_JSON.items():
        if (folder / name).is_file():
            read_json_object(folder / name, fields, f"{flag} {_quoted(path)}: {name}")
    for name in TEXT_VOCABULARIES:
        if (folder / name).is_file():
            _check_utf8(folder / name, f"{flag} {_quoted(path)}: {name}")


def _check_utf8(path: Path, what: str) -> None:
    """Refuse a file that is not UTF-8 text, read in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                decoder.decode(chunk)
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise UserError(f"{what} is not UTF-8 text (near byte {offset + err.start}); it is damaged") from err
    except OSError as err:
        raise UserError(f"could not read {what}: {err.strerror or err}") from err


def available_memory() -> int:
    """Bytes of memory this process can still take: MemAvailable of /proc/meminfo, else free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits_in_memory(n_bytes: float, what: str, fix: str) -> None:
    """Refuse, before allocating, `what` needing `n_bytes` when less memory than that is available.

    Raises:
        UserError: e.g. "the student (100000 layers) needs about 3.1 TB of memory, 12.0 GB are available; <fix>".
    """
    available = available_memory()
    if n_bytes > available:
        raise UserError(f"{what} needs about {_size(n_bytes)} of memory, {_size(available)} are available; {fix}")


def _size(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n_bytes < 1000 or unit == "TB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def bounded_lines(handle: IO[str], limit: int, what: str) -> Iterator[str]:
    """The lines of a text file opened in `handle`, each read with at most `limit` characters in memory.

    Raises:
        UserError: a line is longer than `limit` characters (`what` names the file and the fix).
    """
    number = 0
    while line := handle.readline(limit + 1):
        number += 1
        if len(line) > limit and not line.endswith("\n"):
            raise UserError(f"{what}: line {number} is longer than {limit} characters; split the text into lines")
        yield line


def has_text(path: PathLike) -> bool:
    """Whether the file holds a character that is not whitespace, read in chunks (one huge line included)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            if not chunk.isspace():
                return True
    return False


SAMPLED_ABOVE_BYTES = 256 << 20  # files up to this size are hashed whole
N_SAMPLED_BLOCKS = 64


def fingerprint(path: PathLike) -> dict[str, object]:
    """{"size", "sha256", "sampled"}: a hash of the whole file, or of 64 evenly spread 1 MiB blocks above 256 MiB.

    Sampling keeps a multi-gigabyte corpus quick to recognise; a change that leaves the size and every
    sampled block alike goes unseen, which replaced data does not do.
    """
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    sampled = size > SAMPLED_ABOVE_BYTES
    with open(path, "rb") as handle:
        if not sampled:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
        else:
            for index in range(N_SAMPLED_BLOCKS):
                handle.seek((size - CHUNK_BYTES) * index // (N_SAMPLED_BLOCKS - 1))
                digest.update(handle.read(CHUNK_BYTES))
    return {"size": size, "sha256": digest.hexdigest(), "sampled": sampled}
