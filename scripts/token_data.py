"""Readers of the token files our scripts write, safe on files from anywhere, and the pickle's writer.

- `load_token_id_arrays`: binarized data from binarized_data.py, a pickled list of 1-D integer
  numpy arrays (ours, or the original scripts'); `dump_token_id_arrays` writes it.
- `load_token_counts`: counts from token_counts.py, a pickled list of Python ints.
- `load_token_id_mmap`: binarized data in the memory-mapped format (three .npy files, mapped, not
  loaded; see MMAP_SUFFIX), for corpora larger than memory or shared by many processes.

A pickle can name any importable callable and have it called while loading (os.system, eval,
open, ...). These readers resolve only the numpy helpers that rebuild integer arrays (none at all
for the counts) and refuse every other name before anything runs, so a file from an untrusted
source cannot execute code. A pickle can also declare sizes it does not hold (60 bytes can declare
an array of 200 MB): every size is checked against the bytes of the file before anything of that
size is allocated. A file in the exact layout `dump_token_id_arrays` writes is checked as a whole
and loaded at full speed; any other pickle has its opcodes walked first (`_check_declared_sizes`)
and each array built only once its size agrees with its bytes (`_ArrayBuilder`), several times
slower. What loads is then checked for the expected shape and types.

The reader of a format lives with its writers: the scripts import this module as `token_data`
(they run as `python scripts/<name>.py`), train.py and evaluation.py as `scripts.token_data`
(from the repository root). It imports nothing from the project, so both ways work.
"""

import gc
import math
import mmap
import os
import pickle
import pickletools
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from operator import attrgetter
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

# The functions numpy's own pickles call to rebuild arrays; private, but they are what the files name.
from numpy._core import multiarray as np_multiarray
from numpy._core import numeric as np_numeric


class TokenDataError(ValueError):
    """A token file is missing, damaged, of another kind, or asks to run code: one line for the user."""


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


def _load(path: str | os.PathLike, what: str, unpickle: Callable[[BinaryIO, mmap.mmap], object]) -> object:
    """`unpickle(file, mapped file)` of `path`; every failure becomes a TokenDataError.

    `what` names the expected content in messages ("a list of ..."). The map is for checks that
    read the whole file: the unpickler reads the file handle, from its start.
    """
    source = Path(path)
    if not source.is_file():
        raise TokenDataError(f"{str(source)!r} does not exist or is not a file")
    try:
        with open(source, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise pickle.UnpicklingError("the file is empty")
            # Unmapped once unreferenced: closing it here would fail while an error's traceback holds a view.
            return unpickle(handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
    # A damaged or foreign pickle fails in many ways (UnpicklingError, EOFError, KeyError, TypeError,
    # MemoryError...); all of them mean the same thing to the user.
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TokenDataError(f"{str(source)!r} is not {what}: {reason}") from err


def load_token_id_arrays(path: str | os.PathLike) -> list[np.ndarray]:
    """Safely load a pickle written by binarized_data.py: a list of 1-D integer numpy arrays.

    Args:
        path: the `.pickle` file (ours, or one written by the original scripts).

    Returns:
        The list of token id arrays, each of shape (seq_len,) and dtype uint16 or int32.

    Raises:
        TokenDataError: the file is missing, is not a pickle, holds anything other than a non-empty
            list of 1-D integer arrays, declares sizes it does not hold, or asks to run code while loading.
    """
    data = _load(path, "a list of token id arrays", _unpickle_arrays)
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


def _unpickle_arrays(handle: BinaryIO, data: mmap.mmap) -> object:
    """Unpickle a token id file: at full speed if it is exactly our writer's layout, else checked step by step."""
    if _is_written_here(data):
        return _RestrictedUnpickler(handle, _NUMPY_ARRAY_GLOBALS, _ACCEPTED_ARRAYS).load()
    _check_declared_sizes(data)
    builder = _ArrayBuilder(len(data))
    with _collector_paused():
        return builder.arrays(_RestrictedUnpickler(handle, builder.globals(), _ACCEPTED_ARRAYS).load())


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cycle collector, which would otherwise rescan the millions of objects a load
    keeps alive (half the checked load's time); any cycle a file makes is collected afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _integer_dtype(*args: object) -> np.dtype:
    """np.dtype(...) for the unpickler, refusing every dtype that is not a plain integer type."""
    dtype = np.dtype(*args)
    if dtype.kind not in "iu":
        raise pickle.UnpicklingError(f"refusing a numpy array of dtype {dtype} (token ids are integers)")
    return dtype


_ACCEPTED_ARRAYS = "lists of integer numpy arrays"
# numpy's own helpers, for files checked to be in our writer's layout: they only name them as it does.
_NUMPY_ARRAY_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _integer_dtype,
    ("numpy._core.multiarray", "_reconstruct"): np_multiarray._reconstruct,
}


# ---------------------------------------------------------------- our writer's layout

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
_DTYPE_REDUCE = b"\x85R\x940"  # TUPLE1 REDUCE MEMOIZE POP, after np.dtype and its type string
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
    preamble = [_preamble_head()]
    dtype_opcodes = {}
    for memo, dtype in enumerate(dtypes, start=2):
        preamble += [_pickled_global(np.dtype), _pickled_str(dtype.str), _DTYPE_REDUCE]
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


def _preamble_head() -> bytes:
    """PROTO 4, then _reconstruct and its arguments memoized: how every file of our writer starts."""
    return b"".join([
        b"\x80\x04", _pickled_global(np_multiarray._reconstruct), b"\x940",
        _pickled_global(np.ndarray), b"K\x00\x85C\x01b\x87\x940",
    ])


def _is_written_here(data: mmap.mmap) -> bool:
    """Whether `data` is exactly what dump_token_id_arrays writes, every array's ids present.

    Such a file calls numpy's own helpers on the bytes it carries and nothing else, so unpickling it
    allocates no more than the file holds. Checked with numpy over the whole file (a few passes over
    its bytes, no Python step per array), so loading stays as fast as plain unpickling.
    """
    found = _preamble_dtypes(data)
    if found is None:
        return False
    first, itemsizes = found
    if first >= len(data):
        return False
    if first + 1 == len(data):
        return data[first] == ord(pickle.STOP)  # no array at all
    return data[first] == ord(pickle.MARK) and _arrays_chain(data, first + 1, itemsizes)


def _preamble_dtypes(data: mmap.mmap) -> tuple[int, np.ndarray] | None:
    """Where our writer's preamble ends in `data`, and the itemsize of each dtype memo slot (0: none).

    None if `data` does not start as our writer's files do.
    """
    head, dtype_global = _preamble_head(), _pickled_global(np.dtype)
    if data[: len(head)] != head:
        return None
    pos, itemsizes = len(head), np.zeros(256, dtype=np.int64)
    for memo in range(2, 256):
        if data[pos : pos + len(dtype_global)] != dtype_global:
            break
        name_at = pos + len(dtype_global) + 2  # after SHORT_BINUNICODE and its length
        opcode, length = data[name_at - 2 : name_at].ljust(2, b"\0")
        name = data[name_at : name_at + length].decode("ascii", errors="replace")
        pos = name_at + length + len(_DTYPE_REDUCE)
        if opcode != 0x8C or data[pos - len(_DTYPE_REDUCE) : pos] != _DTYPE_REDUCE or not _is_integer_type_string(name):
            return None
        itemsizes[memo] = np.dtype(name).itemsize
    if data[pos : pos + 1] != b"]":
        return None
    return pos + 1, itemsizes


def _is_integer_type_string(name: str) -> bool:
    """Whether `name` is the type string of a plain integer dtype, as dtype.str gives it ("<u2", "|u1"...)."""
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError):
        return False
    return dtype.kind in "iu" and dtype.str == name


# _ARRAY_HEAD as numpy fields, to read the heads of all arrays at once.
_ARRAY_HEAD_FIELDS = np.dtype([
    ("start", "V9"), ("n", "<i4"), ("tuple1", "u1"), ("binget", "u1"), ("dtype_memo", "u1"), ("newfalse", "u1"),
    ("binbytes", "u1"), ("n_bytes", "<u4"),
])
_SEARCH_CHUNK = 1 << 24


def _arrays_chain(data: mmap.mmap, first: int, itemsizes: np.ndarray) -> bool:
    """Whether `data` from `first` on is our writer's arrays, one after the other, then APPENDS and STOP.

    Every place the first bytes of an array occur is found; then each such array must declare as
    many bytes as its shape times its itemsize, end where the next one starts (or the batch turns,
    APPENDS MARK), and the last end the file. Bytes that merely look like an array's start inside
    some array's ids break the chain: such a file is then read the slow, checked way.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size < first + _ARRAY_HEAD.size:
        return False
    # The array head that would start at each byte (a view: nothing is copied until indexed).
    heads_at = np.ndarray((raw.size - _ARRAY_HEAD.size + 1,), _ARRAY_HEAD_FIELDS, data, strides=(1,))
    starts = _find_array_starts(raw, heads_at, first)
    if starts.size == 0 or starts[0] != first:
        return False
    heads = heads_at[starts]
    n, n_bytes = heads["n"].astype(np.int64), heads["n_bytes"].astype(np.int64)
    itemsize = itemsizes[heads["dtype_memo"]]
    opcodes_ok = (heads["tuple1"] == 0x85) & (heads["binget"] == 0x68) & (heads["newfalse"] == 0x89)
    if not (opcodes_ok & (heads["binbytes"] == 0x42) & (n >= 0) & (itemsize > 0) & (n_bytes == n * itemsize)).all():
        return False
    ends = starts + _ARRAY_HEAD.size + n_bytes  # where each array's ids end, then TUPLE BUILD
    if ends[-1] + 4 != raw.size or (ends[:-1] + 2 > starts[1:]).any():
        return False
    follows = ends[:-1] + 2
    gaps = starts[1:] - follows
    batch_turns = (gaps == 2) & (raw[follows] == ord(pickle.APPENDS)) & (raw[follows + 1] == ord(pickle.MARK))
    return bool(
        (raw[ends] == ord(pickle.TUPLE)).all() and (raw[ends + 1] == ord(pickle.BUILD)).all()
        and ((gaps == 0) | batch_turns).all()
        and raw[-2] == ord(pickle.APPENDS) and raw[-1] == ord(pickle.STOP)
    )


def _find_array_starts(raw: np.ndarray, heads_at: np.ndarray, first: int) -> np.ndarray:
    """(n,) positions from `first` on where `_ARRAY_START` occurs, searched a chunk at a time."""
    pattern, matches = np.void(_ARRAY_START), np.empty(_SEARCH_CHUNK, dtype=bool)  # one buffer for every chunk
    found = []
    for begin in range(first, heads_at.size, _SEARCH_CHUNK):
        chunk = raw[begin : min(begin + _SEARCH_CHUNK, heads_at.size)]
        hits = np.flatnonzero(np.equal(chunk, _ARRAY_START[0], out=matches[: chunk.size])) + begin
        found.append(hits[heads_at["start"][hits] == pattern])
    return np.concatenate(found)


# ---------------------------------------------------------------- sizes any other pickle declares

# CPython's C unpickler (3.11; fixed in 3.14, gh-115952) allocates what an opcode declares before it
# reads it: 15 bytes can declare a 2**40-byte string, 9 bytes fill memo slot 2**31 (16 GB of zeroed
# table). So the opcodes are walked first, from pickletools' table of what follows each: a fixed
# number of bytes, a byte count of some width, or text up to a newline (two for GLOBAL and INST).
_COUNT_FORMATS = {
    pickletools.TAKEN_FROM_ARGUMENT1: "<B",
    pickletools.TAKEN_FROM_ARGUMENT4: "<i",
    pickletools.TAKEN_FROM_ARGUMENT4U: "<I",
    pickletools.TAKEN_FROM_ARGUMENT8U: "<Q",
}


def _opcode_arguments() -> tuple[list[int], dict[int, struct.Struct], dict[int, int]]:
    """Per opcode byte: its length with a fixed argument (0: none or not fixed), the format of a byte
    count, or the lines of text that follow it."""
    fixed, counted, text_lines = [0] * 256, {}, {}
    for opcode in pickletools.opcodes:
        code, arg = ord(opcode.code), opcode.arg
        if arg is None or arg.n >= 0:
            fixed[code] = 1 + (0 if arg is None else arg.n)
        elif arg.n == pickletools.UP_TO_NEWLINE:
            text_lines[code] = 2 if arg.name == "stringnl_noescape_pair" else 1
        else:
            counted[code] = struct.Struct(_COUNT_FORMATS[arg.n])
    for checked in (pickle.STOP, pickle.LONG_BINPUT, pickle.FRAME):  # opcodes _walk_opcodes looks into
        fixed[ord(checked)] = 0
    return fixed, counted, text_lines


_FIXED_LENGTH, _COUNTED_ARG, _TEXT_LINES = _opcode_arguments()
_STOP, _PUT, _LONG_BINPUT, _FRAME = map(ord, (pickle.STOP, pickle.PUT, pickle.LONG_BINPUT, pickle.FRAME))
_UINT4 = struct.Struct("<I")
_UINT8 = struct.Struct("<Q")


def _check_declared_sizes(data: mmap.mmap) -> None:
    """Walk the pickle's opcodes up to STOP; refuse a byte count, frame or memo slot the file cannot hold.

    Nothing is built: the walk reads opcodes and their arguments and skips the bytes they carry. A
    pickle fills memo slots 0, 1, ... an opcode at a time, so a slot beyond the opcode's position is forged.
    """
    try:
        _walk_opcodes(data)
    except struct.error:  # an argument cut off by the end of the file
        raise pickle.UnpicklingError("pickle data was truncated") from None


def _walk_opcodes(data: mmap.mmap) -> None:
    """`_check_declared_sizes` itself: one step per opcode, straight past the bytes it carries."""
    pos, end, fixed_length = 0, len(data), _FIXED_LENGTH
    while pos < end:
        opcode = data[pos]
        if length := fixed_length[opcode]:  # most opcodes: nothing to check
            pos += length
        elif opcode == _STOP:
            return
        elif opcode == _LONG_BINPUT:
            _check_memo_slot(_UINT4.unpack_from(data, pos + 1)[0], pos)
            pos += 1 + _UINT4.size
        elif opcode == _FRAME:
            pos += 1 + _UINT8.size
            _check_byte_count(_UINT8.unpack_from(data, pos - _UINT8.size)[0], pos, end)
        elif (count := _COUNTED_ARG.get(opcode)) is not None:
            start = pos + 1 + count.size
            pos = start + _check_byte_count(count.unpack_from(data, pos + 1)[0], start, end)
        elif (lines := _TEXT_LINES.get(opcode)) is not None:
            line_end = pos
            for _ in range(lines):
                line_end = data.find(b"\n", line_end + 1)
                if line_end < 0:
                    raise pickle.UnpicklingError("pickle data was truncated")
            if opcode == _PUT:
                _check_memo_slot(int(data[pos + 1 : line_end]), pos)
            pos = line_end + 1
        else:
            raise pickle.UnpicklingError(f"byte {pos} is not a pickle opcode ({opcode:#04x})")
    raise pickle.UnpicklingError("pickle data was truncated")


def _check_byte_count(count: int, start: int, end: int) -> int:
    """`count`, if that many bytes lie between `start` and the end of the file."""
    if not 0 <= count <= end - start:
        raise pickle.UnpicklingError(
            f"byte {start} declares {count} bytes where the file holds {end - start} more (forged or truncated)"
        )
    return count


def _check_memo_slot(slot: int, pos: int) -> None:
    """Refuse memo slot `slot` filled at byte `pos`: a genuine pickle has filled at most `pos` slots before."""
    if not 0 <= slot <= pos:
        raise pickle.UnpicklingError(f"byte {pos} fills memo slot {slot}, which no pickle of this size can reach")


# ---------------------------------------------------------------- arrays of any other pickle


def _element_count(shape: object) -> int:
    """The number of elements of a declared shape, which must be a tuple of non-negative ints."""
    if type(shape) is tuple and len(shape) == 1 and type(shape[0]) is int and shape[0] >= 0:  # token ids: fast
        return shape[0]
    if type(shape) is not tuple or not all(type(n) is int and n >= 0 for n in shape):
        raise pickle.UnpicklingError("an array declares a shape that is not a tuple of non-negative ints")
    return math.prod(shape)


class _ArrayShell:
    """An array yet to be filled: what numpy's `_reconstruct` gives while a token file is unpickled here.

    numpy pickles an array as `_reconstruct(ndarray, (0,), b"b")`, an empty array, then BUILD with its
    state `(version, shape, dtype, fortran, bytes)`. Here `ndarray` is a subclass of this shell and
    `_reconstruct` is `object.__new__`, so those arguments allocate nothing, and BUILD calls
    `__setstate__`, where the builder checks the state before numpy makes an array of it.
    """

    __slots__ = ("array",)
    builder: "_ArrayBuilder"

    def __init__(self, *args: object) -> None:
        """Refuses `ndarray(shape, ...)` called directly; also what lets `object.__new__` take numpy's arguments."""
        if args:
            raise pickle.UnpicklingError("refusing to call numpy.ndarray: an array must come with its data")

    def __setstate__(self, state: tuple) -> None:
        self.array = self.builder.from_state(state)


class _ArrayBuilder:
    """Makes the arrays of one token file, each once its declared size agrees with the bytes it carries.

    Every array is charged its bytes against the size of the file: in a genuine file the bytes of
    each array are in the file once, so arrays reusing the bytes of one memoized object (which numpy
    would copy for each) are refused before their total exceeds the file.
    """

    def __init__(self, file_size: int):
        self.bytes_left = file_size
        self.shell = type("ArrayShell", (_ArrayShell,), {"__slots__": (), "builder": self})
        self._dtypes: dict[int, tuple[object, np.dtype]] = {}

    def globals(self) -> dict[tuple[str, str], object]:
        """What an array pickle may name, under the module names numpy 1.x and 2.x write (protocol 4
        pickles rebuild arrays through _reconstruct, protocol 5 pickles through _frombuffer)."""
        return {
            ("numpy", "ndarray"): self.shell,
            ("numpy", "dtype"): _integer_dtype,
            ("numpy._core.multiarray", "_reconstruct"): object.__new__,
            ("numpy.core.multiarray", "_reconstruct"): object.__new__,
            ("numpy._core.numeric", "_frombuffer"): self.from_buffer,
            ("numpy.core.numeric", "_frombuffer"): self.from_buffer,
        }

    def from_state(self, state: tuple) -> np.ndarray:
        """The array of numpy's BUILD state `(version, shape, dtype, fortran, bytes)`."""
        version, shape, dtype, fortran, data = state
        if type(data) is not bytes:
            raise pickle.UnpicklingError(f"an array's data is a {type(data).__name__}, not bytes")
        dtype = self._canonical(dtype)
        self._charge(shape, dtype, len(data))
        array = np_multiarray._reconstruct(np.ndarray, (0,), b"b")
        array.__setstate__((version, shape, dtype, fortran, data))
        return array

    def from_buffer(self, buffer: object, dtype: object, shape: object, *order: object) -> _ArrayShell:
        """numpy's `_frombuffer(buffer, dtype, shape, order)` of protocol 5 pickles: a view of the buffer."""
        if type(buffer) not in (bytes, bytearray):
            raise pickle.UnpicklingError(f"an array's data is a {type(buffer).__name__}, not bytes")
        dtype = self._canonical(dtype)
        self._charge(shape, dtype, len(buffer))
        shell = self.shell()
        shell.array = np_numeric._frombuffer(buffer, dtype, shape, *order)
        return shell

    def arrays(self, data: object) -> object:
        """`data`, a list, with each shell replaced by its array; anything else is left for the caller to name."""
        if type(data) is not list:
            return data
        try:
            return [item.array if type(item) is self.shell else item for item in data]
        except AttributeError:  # a shell that no BUILD filled
            raise pickle.UnpicklingError("an array is declared without its data") from None

    def _charge(self, shape: object, dtype: np.dtype, n_bytes: int) -> None:
        """Refuse an array whose shape and dtype disagree with its bytes, or one past the file's size."""
        declared = _element_count(shape) * dtype.itemsize
        if declared != n_bytes:
            raise pickle.UnpicklingError(
                f"an array declares {declared} bytes ({dtype} of shape {shape}) but carries {n_bytes}"
            )
        self.bytes_left -= n_bytes
        if self.bytes_left < 0:
            raise pickle.UnpicklingError("its arrays add up to more bytes than the file holds (reused bytes)")

    def _canonical(self, dtype: object) -> np.dtype:
        """The plain integer dtype `dtype` names, however BUILD changed that dtype object (cached per object).

        The dtype object a pickle builds can be changed by a later BUILD (a subarray or fields set on
        it, which numpy's size arithmetic would trust); rebuilt from its type string, they are gone.
        """
        cached = self._dtypes.get(id(dtype))
        if cached is not None and cached[0] is dtype:
            return cached[1]
        if not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError(f"an array's dtype is a {type(dtype).__name__}")
        canonical = _integer_dtype(dtype.str)
        self._dtypes[id(dtype)] = (dtype, canonical)  # the reference keeps the id from being reused
        return canonical


def load_token_counts(path: str | os.PathLike) -> list[int]:
    """Safely load a pickle written by token_counts.py: a non-empty list of non-negative Python ints.

    A list of ints pickles without naming any global, so none is resolved at all.

    Args:
        path: the counts file; entry i is the number of occurrences of token id i.

    Returns:
        The counts, vocab_size long.

    Raises:
        TokenDataError: the file is missing, is not a pickle, holds anything else (a count beyond int64
            too), declares sizes it does not hold, or asks to run code.
    """
    counts = _load(path, "a list of token counts", _unpickle_counts)
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
    if max(counts) >= 1 << 63:
        raise TokenDataError(f"{prefix}: it holds a count of {max(counts).bit_length()} bits, beyond int64")
    return counts


def _unpickle_counts(handle: BinaryIO, data: mmap.mmap) -> object:
    """Unpickle a counts file, its declared sizes checked first, resolving no global at all."""
    _check_declared_sizes(data)
    return _RestrictedUnpickler(handle, {}, "lists of ints").load()


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
