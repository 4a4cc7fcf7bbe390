"""Readers of the token files our scripts write, safe on files from anywhere, and the pickle's writer.

- `load_token_id_arrays`: binarized data from binarized_data.py, a pickled list of 1-D integer
  numpy arrays (ours, or the original scripts'); `dump_token_id_arrays` writes it.
- `load_token_counts`: counts from token_counts.py, a pickled list of Python ints.
- `load_token_id_mmap`: binarized data in the memory-mapped format (three .npy files, mapped, not
  loaded; see MMAP_SUFFIX), for corpora larger than memory or shared by many processes.

A pickle can name any importable callable and have it called while loading (os.system, eval,
open, ...). These readers resolve only the numpy helpers that rebuild integer arrays (none at all
for the counts) and refuse every other name before anything runs, so a file from an untrusted
source cannot execute code; what loads is then checked for the expected shape and types.

The reader of a format lives with its writers: the scripts import this module as `token_data`
(they run as `python scripts/<name>.py`), train.py and evaluation.py as `scripts.token_data`
(from the repository root). It imports nothing from the project, so both ways work.
"""

import os
import pickle
import struct
from collections.abc import Sequence
from operator import attrgetter
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

# The functions numpy's own pickles call to rebuild arrays; private, but they are what the files name.
from numpy._core import multiarray as np_multiarray
from numpy._core import numeric as np_numeric


class TokenDataError(ValueError):
    """A token file is missing, damaged, of another kind, or asks to run code: one line for the user."""


def _integer_dtype(*args: object) -> np.dtype:
    """np.dtype(...) for the unpickler, refusing every dtype that is not a plain integer type."""
    dtype = np.dtype(*args)
    if dtype.kind not in "iu":
        raise pickle.UnpicklingError(f"refusing a numpy array of dtype {dtype} (token ids are integers)")
    return dtype


# What unpickling a list of numpy arrays needs, under the module names numpy 1.x and 2.x write
# (protocol 4 pickles go through _reconstruct, protocol 5 pickles through _frombuffer).
_ARRAY_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _integer_dtype,
    ("numpy._core.multiarray", "_reconstruct"): np_multiarray._reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): np_multiarray._reconstruct,
    ("numpy._core.numeric", "_frombuffer"): np_numeric._frombuffer,
    ("numpy.core.numeric", "_frombuffer"): np_numeric._frombuffer,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in `allowed`; any other name is refused unresolved."""

    def __init__(self, file, allowed: dict[tuple[str, str], object], accepted: str):
        super().__init__(file)
        self.allowed = allowed
        self.accepted = accepted

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            message = f"refusing to load {module}.{name}: only {self.accepted} are accepted"
            raise pickle.UnpicklingError(message) from None


def _load(path: str | os.PathLike, allowed: dict[tuple[str, str], object], what: str, accepted: str) -> object:
    """Unpickle `path` with only `allowed` globals; every failure becomes a TokenDataError.

    `what` names the expected content in messages ("a list of ..."), `accepted` in refusals ("lists of ...").
    """
    source = Path(path)
    if not source.is_file():
        raise TokenDataError(f"{str(source)!r} does not exist or is not a file")
    try:
        with open(source, "rb") as handle:
            return _RestrictedUnpickler(handle, allowed, accepted).load()
    # A damaged or foreign pickle fails in many ways (UnpicklingError, EOFError, KeyError, TypeError...);
    # all of them mean the same thing to the user.
    except Exception as err:
        raise TokenDataError(f"{str(source)!r} is not {what}: {err}") from err


def load_token_id_arrays(path: str | os.PathLike) -> list[np.ndarray]:
    """Safely load a pickle written by binarized_data.py: a list of 1-D integer numpy arrays.

    Args:
        path: the `.pickle` file (ours, or one written by the original scripts).

    Returns:
        The list of token id arrays, each of shape (seq_len,) and dtype uint16 or int32.

    Raises:
        TokenDataError: the file is missing, is not a pickle, holds anything other than a non-empty
            list of 1-D integer arrays, or asks to run code while loading.
    """
    data = _load(path, _ARRAY_GLOBALS, "a list of token id arrays", "lists of integer numpy arrays")
    prefix = f"{str(path)!r} is not a list of token id arrays"
    if type(data) is not list:
        raise TokenDataError(f"{prefix}: it holds a {type(data).__name__}")
    if not data:
        raise TokenDataError(f"{str(path)!r} holds no sequences")
    types = set(map(type, data))
    if types != {np.ndarray}:
        found = ", ".join(sorted(t.__name__ for t in types))
        raise TokenDataError(f"{prefix}: its items are {found}")
    kinds = {dtype.kind for dtype in set(map(attrgetter("dtype"), data))}
    if not kinds <= set("iu"):
        raise TokenDataError(f"{prefix}: it holds arrays of dtype kind {sorted(kinds)} (token ids are integers)")
    if set(map(attrgetter("ndim"), data)) != {1}:
        raise TokenDataError(f"{prefix}: its arrays are not all 1-D")
    return data


# dump_token_id_arrays writes the pickle opcodes itself (numbers in comments are memo slots):
#   PROTO 4; memoize _reconstruct [0], its arguments (ndarray, (0,), b"b") [1] and each dtype [2, 3...];
#   EMPTY_LIST; then per batch MARK, per array
#     BINGET 0, BINGET 1, REDUCE                   an empty array, as numpy's own pickles start
#     MARK 1 (n,) BINGET dtype False BINBYTES ids  its state, as ndarray.__reduce__ gives it
#     TUPLE BUILD                                  ndarray.__setstate__ fills it
#   APPENDS; and STOP.
_ARRAY_HEAD = struct.Struct("<9si5sI")  # opcodes up to the shape, n, opcodes up to the ids, their byte count
_ARRAY_START = b"h\x00h\x01R(K\x01J"
_ARRAY_END = b"tb"
_PICKLE_BATCH = 10_000


def dump_token_id_arrays(sequences: Sequence[np.ndarray], handle: BinaryIO) -> None:
    """Pickle a list of 1-D integer arrays to `handle`, 3.5x faster than pickle.dump; it loads into the same arrays.

    pickle.dump calls numpy's `__reduce_ex__` for every array, about 2 µs each, most of the writing
    time for millions of short lines. Here each array is a fixed run of protocol-4 opcodes around
    its bytes (layout above): `pickle.load` (the original scripts) and `load_token_id_arrays` rebuild
    the same arrays, through the same numpy calls, as from numpy's own pickles.

    Args:
        sequences: 1-D C-contiguous integer arrays (slices of a larger array are fine).
        handle: a binary file open for writing.
    """
    dtypes = sorted(set(map(attrgetter("dtype"), sequences)), key=str)
    if any(dtype.kind not in "iu" for dtype in dtypes):
        raise ValueError(f"token id arrays must be integers, not {', '.join(map(str, dtypes))}")
    preamble = [b"\x80\x04", _pickled_global(np_multiarray._reconstruct), b"\x940"]
    preamble += [_pickled_global(np.ndarray), b"K\x00\x85C\x01b\x87\x940"]
    dtype_opcodes = {}
    for memo, dtype in enumerate(dtypes, start=2):
        preamble += [_pickled_global(np.dtype), _pickled_str(dtype.str), b"\x85R\x940"]
        dtype_opcodes[dtype] = b"\x85h" + bytes([memo]) + b"\x89B"
    handle.write(b"".join([*preamble, b"]"]))
    pack = _ARRAY_HEAD.pack
    for begin in range(0, len(sequences), _PICKLE_BATCH):
        parts = [b"("]
        for ids in sequences[begin : begin + _PICKLE_BATCH]:
            parts += (pack(_ARRAY_START, len(ids), dtype_opcodes[ids.dtype], ids.nbytes), ids, _ARRAY_END)
        parts.append(b"e")
        handle.write(b"".join(parts))
    handle.write(b".")


def _pickled_str(text: str) -> bytes:
    """SHORT_BINUNICODE `text` (under 256 bytes)."""
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def _pickled_global(obj: type | object) -> bytes:
    """The opcodes that push `obj`, a module-level class or function, by its module and name."""
    return _pickled_str(obj.__module__) + _pickled_str(obj.__name__) + b"\x93"


def load_token_counts(path: str | os.PathLike) -> list[int]:
    """Safely load a pickle written by token_counts.py: a non-empty list of non-negative Python ints.

    A list of ints pickles without naming any global, so none is resolved at all.

    Args:
        path: the counts file; entry i is the number of occurrences of token id i.

    Returns:
        The counts, vocab_size long.

    Raises:
        TokenDataError: the file is missing, is not a pickle, holds anything else, or asks to run code.
    """
    counts = _load(path, {}, "a list of token counts", "lists of ints")
    prefix = f"{str(path)!r} is not a list of token counts"
    if type(counts) is not list:
        raise TokenDataError(f"{prefix}: it holds a {type(counts).__name__}")
    if not counts:
        raise TokenDataError(f"{str(path)!r} holds no counts")
    if not all(type(count) is int for count in counts):
        found = ", ".join(sorted({type(count).__name__ for count in counts}))
        raise TokenDataError(f"{prefix}: its items are {found}")
    if min(counts) < 0:
        raise TokenDataError(f"{prefix}: it holds a negative count ({min(counts)})")
    return counts


# ---------------------------------------------------------------- the memory-mapped format

# Binarized data too large to load whole in every process is stored as three .npy files sharing a
# prefix, written by binarized_data.py --format mmap or convert_to_mmap.py, and named by the first:
#   {prefix}.ids.npy      (n_tokens,) uint16 or int32: every sequence's ids, one after the other
#   {prefix}.offsets.npy  (n_sequences + 1,) int64: sequence k is ids[offsets[k]:offsets[k + 1]]
#   {prefix}.order.npy    (n_sequences,) int64: the shuffle, train on sequence order[0] first, ...
# Plain .npy files: np.load(..., mmap_mode="r") maps them, and the page cache holds one copy of the
# ids for every process of a machine. They hold no pickled objects, so nothing in them can run.
MMAP_SUFFIX = ".ids.npy"
MMAP_PARTS = ("ids", "offsets", "order")


class MappedTokenIds(NamedTuple):
    """The arrays of the memory-mapped format, each an np.memmap (see MMAP_SUFFIX above for shapes)."""

    ids: np.ndarray
    offsets: np.ndarray
    order: np.ndarray


def is_mmap_file(path: str | os.PathLike) -> bool:
    """Whether `path` names binarized data in the memory-mapped format (a .npy file) rather than a pickle."""
    return str(path).endswith(".npy")


def mmap_files(path: str | os.PathLike) -> dict[str, Path]:
    """The three files of the memory-mapped format, {"ids": ..., "offsets": ..., "order": ...}, from its ids file.

    Raises:
        TokenDataError: `path` does not end with `.ids.npy`.
    """
    name = str(path)
    if not name.endswith(MMAP_SUFFIX):
        raise TokenDataError(
            f"{name!r} is not the {MMAP_SUFFIX} file of memory-mapped binarized data; name that file, its "
            f".offsets.npy and .order.npy lie beside it"
        )
    prefix = name[: -len(MMAP_SUFFIX)]
    return {part: Path(f"{prefix}.{part}.npy") for part in MMAP_PARTS}


def load_token_id_mmap(path: str | os.PathLike) -> MappedTokenIds:
    """Map the three files of the memory-mapped format and check that they fit together.

    Nothing is read into memory but the checks' passes over offsets and order (8 bytes per
    sequence each, freed on return): the ids stay on disk and in the shared page cache.

    Args:
        path: the `.ids.npy` file; the `.offsets.npy` and `.order.npy` files lie beside it.

    Returns:
        ids (n_tokens,), offsets (n_sequences + 1,) and order (n_sequences,), read-only memmaps.

    Raises:
        TokenDataError: a file is missing, truncated or not a 1-D integer .npy array, or the files
            do not fit together (offsets not running from 0 to the number of ids, going backwards,
            or order not a permutation of the sequences).
    """
    files = mmap_files(path)
    mapped = MappedTokenIds(*(_map_npy(files[part]) for part in MMAP_PARTS))
    _check_mapped(mapped, files)
    return mapped


def _map_npy(path: Path) -> np.ndarray:
    """np.load(path, mmap_mode="r") of a 1-D integer array, every failure a TokenDataError."""
    if not path.is_file():
        raise TokenDataError(f"{str(path)!r} does not exist or is not a file")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    # A bad header is a ValueError, a file shorter than its header says an OSError or ValueError
    # from mmap, an empty file an EOFError...: all mean the same thing to the user.
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TokenDataError(f"{str(path)!r} is not a complete .npy array (truncated or damaged?): {reason}") from err
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise TokenDataError(f"{str(path)!r} holds a {array.ndim}-D array of {array.dtype}, not 1-D integers")
    return array


def _check_mapped(mapped: MappedTokenIds, files: dict[str, Path]) -> None:
    """Raise a TokenDataError unless offsets cut the ids into sequences and order permutes them."""
    ids_file, offsets_file, order_file = (repr(str(files[part])) for part in MMAP_PARTS)
    offsets, order = mapped.offsets, mapped.order
    rewrite = "were the files written together? Write them again with scripts/binarized_data.py --format mmap"
    if len(offsets) < 2:
        raise TokenDataError(f"{offsets_file} holds no sequences")
    if offsets[0] != 0 or offsets[-1] != mapped.ids.size:
        raise TokenDataError(
            f"{offsets_file} does not match {ids_file}: its offsets run from {offsets[0]} to {offsets[-1]} but "
            f"there are {mapped.ids.size} ids; {rewrite}"
        )
    if (np.diff(offsets) < 0).any():
        raise TokenDataError(f"{offsets_file} is damaged: its offsets go backwards")
    n = len(offsets) - 1
    if len(order) != n:
        raise TokenDataError(f"{order_file} orders {len(order)} sequences but {offsets_file} holds {n}; {rewrite}")
    if order.min() < 0 or order.max() >= n or (np.bincount(order, minlength=n) != 1).any():
        raise TokenDataError(f"{order_file} is damaged: it is not a permutation of the {n} sequences")
