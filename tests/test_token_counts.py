"""scripts/token_counts.py and the safe loader it uses (token_data.load_token_id_arrays)."""

import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import token_counts
import token_data
from cli_checks import assert_one_line_error
from cli_utils import ScriptError
from token_data import TokenDataError, dump_token_id_arrays, load_token_counts, load_token_id_arrays
from token_counts import count_tokens

VOCAB_SIZE = 500


def random_sequences(seed: int, n: int = 300, vocab_size: int = VOCAB_SIZE, dtype=np.uint16) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=rng.integers(1, 40)).astype(dtype) for _ in range(n)]


def slow_counts(sequences: list[np.ndarray], vocab_size: int) -> list[int]:
    """Reference: one Python loop over every id."""
    counter = Counter(int(i) for seq in sequences for i in seq)
    return [counter.get(i, 0) for i in range(vocab_size)]


class Payload:
    """Unpickling this runs `command` through os.system: what a poisoned data file would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class NumpyOnePickler(pickle._Pickler):
    """Writes arrays the way numpy 1.x did, naming numpy.core.multiarray instead of numpy._core."""

    def save_global(self, obj, name=None):
        if obj is np._core.multiarray._reconstruct:
            self.save("numpy.core.multiarray")
            self.save("_reconstruct")
            self.write(pickle.STACK_GLOBAL)
        else:
            super().save_global(obj, name)


def dump(path: Path, obj: object, protocol: int = 4) -> Path:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=protocol)
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """Data files token_counts.py must refuse, and the file the malicious ones would create."""
    root = tmp_path_factory.mktemp("bad")
    marker = root / "pwned"
    good = random_sequences(1, n=5)
    text = root / "text.pickle"
    text.write_text("this is not a pickle\n")
    truncated = root / "truncated.pickle"
    truncated.write_bytes(pickle.dumps(good, protocol=4)[:-20])
    (root / "forged_shape.pickle").write_bytes(CRAFTED_ARRAYS["reconstruct_shape"])
    (root / "memo_slot.pickle").write_bytes(CRAFTED_OPCODES["memo_slot"])
    return {
        "dict": dump(root / "dict.pickle", {"ids": good}),
        "floats": dump(root / "floats.pickle", [seq.astype(np.float32) for seq in good]),
        "lists": dump(root / "lists.pickle", [seq.tolist() for seq in good]),
        "2d": dump(root / "2d.pickle", [np.zeros((2, 3), dtype=np.uint16)]),
        "text": text,
        "truncated": truncated,
        "os_system": dump(root / "os_system.pickle", Payload(f"touch {marker}")),
        "late_payload": dump(root / "late_payload.pickle", [*good, Payload(f"touch {marker}")]),
        "missing": root / "missing.pickle",
        "forged_shape": root / "forged_shape.pickle",
        "memo_slot": root / "memo_slot.pickle",
        "_marker": marker,
    }


def run_script(repo_root: Path, cwd: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, str(repo_root / "scripts" / "token_counts.py"), *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, repo_root, bad_files):
    """Every CLI case started at once from a folder that is not the repository; {case: (result, output)}."""
    root = tmp_path_factory.mktemp("runs")
    cwd = tmp_path_factory.mktemp("elsewhere")
    sequences = random_sequences(0) + random_sequences(1, dtype=np.int32)
    data = dump(root / "data.pickle", sequences)
    cases = {"ok": [str(data)], "out_of_range": [str(data), "--vocab_size", "300"]}
    cases.update({name: [str(path)] for name, path in bad_files.items() if not name.startswith("_")})
    started = {}
    for case, (data_file, *rest) in cases.items():
        output = root / f"counts.{case}.pickle"
        args = ["--data_file", data_file, "--token_counts_dump", str(output), "--vocab_size", str(VOCAB_SIZE), *rest]
        started[case] = (run_script(repo_root, cwd, *args), output)
    results = {}
    for case, (process, output) in started.items():
        stdout, stderr = process.communicate(timeout=60)
        results[case] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), output)
    results["ok"] += (sequences,)
    return results


def test_cli_counts_equal_a_slow_count(runs):
    result, output, sequences = runs["ok"]
    assert result.returncode == 0, result.stderr
    with open(output, "rb") as handle:
        counts = pickle.load(handle)
    assert type(counts) is list and all(type(c) is int for c in counts)
    assert counts == slow_counts(sequences, VOCAB_SIZE)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("group, slice_", [(4096, 1 << 22), (7, 5), (1, 1000)])
def test_count_tokens_equals_a_slow_count(monkeypatch, dtype, group, slice_):
    sequences = random_sequences(2, dtype=dtype)
    monkeypatch.setattr(token_counts, "_GROUP", group)  # groups and slices that end mid-way
    monkeypatch.setattr(token_counts, "_SLICE", slice_)
    assert count_tokens(sequences, VOCAB_SIZE) == slow_counts(sequences, VOCAB_SIZE)


def test_count_tokens_mixed_dtypes_and_non_contiguous_arrays():
    flat = np.arange(30, dtype=np.uint16)
    sequences = [flat[::2], np.int32([1, 2, 2]), flat[3:9], np.uint16([])]
    assert count_tokens(sequences, 30) == slow_counts(sequences, 30)
    for same_dtype in ([flat[::3], flat[1:4]], [flat[2:5], flat[7:]]):  # views: strided, then contiguous
        assert count_tokens(same_dtype, 30) == slow_counts(same_dtype, 30)


def test_count_tokens_by_hand():
    sequences = [np.array([2, 5, 5, 3], dtype=np.uint16), np.array([2, 3], dtype=np.uint16)]
    assert count_tokens(sequences, 7) == [0, 0, 2, 2, 0, 2, 0]


def test_out_of_range_id_names_the_largest_id(runs):
    result, output = runs["out_of_range"][:2]
    assert_one_line_error(result, "token id 499 (the largest id seen)", "--vocab_size is 300")
    assert not output.exists()


def test_negative_id_is_an_error():
    with pytest.raises(ScriptError, match="negative token id"):
        count_tokens([np.array([2, -1, 3], dtype=np.int32)], 10)


def test_largest_id_is_named_even_past_the_first_bad_group(monkeypatch):
    monkeypatch.setattr(token_counts, "_GROUP", 1)
    sequences = [np.uint16([2, 3]), np.uint16([2, 12, 3]), np.uint16([2, 40, 3])]
    with pytest.raises(ScriptError, match="token id 40 \\(the largest id seen\\)"):
        count_tokens(sequences, 10)


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("dict", ["it holds a dict"]),
        ("floats", ["float32"]),
        ("lists", ["its items are list"]),
        ("2d", ["not all 1-D"]),
        ("text", ["is not a list of token id arrays"]),
        ("truncated", ["is not a list of token id arrays"]),
        ("os_system", ["refusing to load", ".system"]),
        ("late_payload", ["refusing to load", ".system"]),
        ("missing", ["does not exist"]),
        ("forged_shape", ["an array is declared without its data"]),
        ("memo_slot", ["fills memo slot 12500000"]),
    ],
)
def test_bad_data_file_is_a_one_line_error_and_writes_nothing(runs, bad_files, case, fragments):
    result, output = runs[case][:2]
    assert_one_line_error(result, str(bad_files[case].name), *fragments)
    assert not output.exists()
    assert [p.name for p in output.parent.iterdir() if p.name.startswith(".")] == []
    assert not bad_files["_marker"].exists()


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_loader_accepts_what_binarized_data_and_the_original_wrote(tmp_path, protocol):
    # The original stored np.uint16(list) per line; views of a larger array pickle their own ids only.
    flat = np.arange(40, dtype=np.int32)
    sequences = [np.uint16([2, 7, 3]), flat[5:9], np.arange(3, dtype=np.int64)]
    loaded = load_token_id_arrays(dump(tmp_path / "data.pickle", sequences, protocol))
    assert [(seq.dtype, seq.tolist()) for seq in loaded] == [(seq.dtype, seq.tolist()) for seq in sequences]


def test_loader_accepts_numpy_1_pickles(tmp_path):
    path = tmp_path / "numpy1.pickle"
    with open(path, "wb") as handle:
        NumpyOnePickler(handle, protocol=4).dump([np.uint16([2, 7, 3])])
    assert b"numpy.core.multiarray" in path.read_bytes()
    assert [seq.tolist() for seq in load_token_id_arrays(path)] == [[2, 7, 3]]


@pytest.mark.parametrize(
    "obj, message",
    [
        ([np.array([1, "a"], dtype=object)], "dtype object"),
        ([np.array([True, False])], "dtype bool"),
        ([], "holds no sequences"),
        ([np.uint16([1]), 3], "its items are int, ndarray"),
    ],
)
def test_loader_refuses_other_contents(tmp_path, obj, message):
    with pytest.raises(TokenDataError, match=message):
        load_token_id_arrays(dump(tmp_path / "x.pickle", obj))


# ---------------------------------------------------------------- sizes a crafted pickle declares
#
# Each file below is a few bytes to a few hundred KB and declares (or, through reused bytes, builds)
# about 200 MB. Loading must refuse it with one line before allocating anything of that size:
# tracemalloc sees every allocation of Python objects, pickle's own tables and numpy arrays.

DECLARED = 200_000_000


def op_str(text: str) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text.encode()  # SHORT_BINUNICODE


def op_global(module: str, name: str) -> bytes:
    return op_str(module) + op_str(name) + b"\x93"  # STACK_GLOBAL


def op_int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT


def op_bytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data  # BINBYTES


def op_dtype(name: str) -> bytes:
    return op_global("numpy", "dtype") + op_str(name) + b"\x85R"  # dtype(name)


RECONSTRUCT = op_global("numpy._core.multiarray", "_reconstruct")
NDARRAY = op_global("numpy", "ndarray")
EMPTY_ARRAY_ARGS = NDARRAY + b"K\x00\x85C\x01b\x87"  # (ndarray, (0,), b"b"), as numpy's pickles have it


def reused_bytes(dtype: str, n_bytes: int, copies: int) -> bytes:
    """One array state (with its bytes) memoized once, then BUILD into `copies` arrays: numpy copies the
    bytes of a small or byte-swapped array for each."""
    state = b"(K\x01" + op_int(n_bytes // np.dtype(dtype).itemsize) + b"\x85" + op_dtype(dtype) + b"\x89"
    state += op_bytes(bytes(n_bytes)) + b"t"
    head = b"\x80\x04" + RECONSTRUCT + b"\x94" + EMPTY_ARRAY_ARGS + b"\x94" + state + b"\x940]("
    return head + b"h\x00h\x01Rh\x02b" * copies + b"e."


def reused_buffer(n_bytes: int, copies: int) -> bytes:
    """Protocol 5's _frombuffer on one memoized bytearray, `copies` times: views that count n_bytes each."""
    head = b"\x80\x05" + op_global("numpy._core.numeric", "_frombuffer") + b"\x94"
    head += b"\x96" + struct.pack("<Q", n_bytes) + bytes(n_bytes) + b"\x94" + op_dtype("|u1") + b"\x94]("
    call = b"h\x00(h\x01h\x02" + op_int(n_bytes) + b"\x85" + op_str("C") + b"tR"
    return head + call * copies + b"e."


def subarray_dtype() -> bytes:
    """A dtype that BUILD turns into a (DECLARED,) subarray, then _reconstruct of one such element."""
    subarray = op_dtype("|u1") + op_int(DECLARED) + b"\x85\x86"  # (dtype("|u1"), (DECLARED,))
    state = b"(K\x03" + op_str("|") + subarray + b"NN" + op_int(DECLARED) + b"K\x01K\x00t"
    dtype = op_global("numpy", "dtype") + op_str("u1") + b"\x89\x88\x87R" + state + b"b"
    return b"\x80\x04]" + RECONSTRUCT + NDARRAY + b"K\x01\x85" + dtype + b"\x87Ra."


CRAFTED_ARRAYS = {
    # the 60-byte file: an empty array of a declared shape, never filled
    "reconstruct_shape": b"\x80\x04]" + RECONSTRUCT + NDARRAY + op_int(DECLARED) + b"\x85C\x01b\x87Ra.",
    "ndarray_called": b"\x80\x04]" + NDARRAY + op_int(DECLARED) + b"\x85" + op_dtype("|u1") + b"\x86Ra.",
    "subarray_dtype": subarray_dtype(),
    "reused_small_bytes": reused_bytes("<u2", 1000, DECLARED // 1000),
    "reused_swapped_bytes": reused_bytes(">u2", 100_000, DECLARED // 100_000),
    "reused_protocol5_buffer": reused_buffer(100_000, DECLARED // 100_000),
}
# Sizes in the opcodes themselves, which CPython 3.11's C unpickler allocates before reading further.
CRAFTED_OPCODES = {
    "binbytes8": b"\x80\x04]\x8e" + struct.pack("<Q", DECLARED) + b"abc",
    "bytearray8": b"\x80\x05]\x96" + struct.pack("<Q", DECLARED) + b"abc",
    "binunicode8": b"\x80\x04]\x8d" + struct.pack("<Q", DECLARED) + b"abc",
    "long4": b"\x80\x04]\x8b" + struct.pack("<i", DECLARED) + b"abc",
    "frame": b"\x80\x04\x95" + struct.pack("<Q", DECLARED) + b"].",
    "memo_slot": b"\x80\x02]r" + struct.pack("<I", DECLARED // 16) + b".",  # a table of DECLARED // 8 pointers
    "text_memo_slot": b"(lp" + str(DECLARED // 16).encode() + b"\n.",
}


def traced_peak(call) -> int:
    """Peak bytes allocated while `call()` runs."""
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("case", sorted(CRAFTED_ARRAYS) + sorted(CRAFTED_OPCODES))
def test_a_crafted_data_file_is_refused_before_it_allocates(case, tmp_path):
    data_file = tmp_path / "crafted.pickle"
    data_file.write_bytes({**CRAFTED_ARRAYS, **CRAFTED_OPCODES}[case])
    output = tmp_path / "counts.pickle"
    argv = ["--data_file", str(data_file), "--token_counts_dump", str(output), "--vocab_size", str(VOCAB_SIZE)]

    def run() -> None:
        with pytest.raises(TokenDataError, match=f"'{data_file}' is not a list of token id arrays: "):
            token_counts.main(argv)

    assert traced_peak(run) < data_file.stat().st_size + 4_000_000
    assert list(tmp_path.iterdir()) == [data_file]


@pytest.mark.parametrize("case", ["long4", "frame", "memo_slot", "text_memo_slot", "binbytes8"])
def test_a_crafted_counts_file_is_refused_before_it_allocates(case, tmp_path):
    path = tmp_path / "counts.pickle"
    path.write_bytes(CRAFTED_OPCODES[case])

    def run() -> None:
        with pytest.raises(TokenDataError, match="is not a list of token counts: .*(declares|memo slot)"):
            load_token_counts(path)

    assert traced_peak(run) < 4_000_000


def test_counts_beyond_int64_are_refused(tmp_path):
    path = dump(tmp_path / "counts.pickle", [3, 2**70, 1])
    with pytest.raises(TokenDataError, match="a count of 71 bits, beyond int64"):
        load_token_counts(path)


def test_our_files_take_the_fast_path_and_others_the_checked_one(tmp_path, monkeypatch):
    """The writer's layout is recognised whole, so its files skip the opcode walk (several times slower)."""
    sequences = random_sequences(3, n=25_000)  # more than one batch of the writer
    ours = tmp_path / "ours.pickle"
    with open(ours, "wb") as handle:
        dump_token_id_arrays(sequences, handle)
    walked = []
    monkeypatch.setattr(token_data, "_check_declared_sizes", walked.append)
    assert [seq.tolist() for seq in load_token_id_arrays(ours)] == [seq.tolist() for seq in sequences]
    assert walked == []
    load_token_id_arrays(dump(tmp_path / "numpy.pickle", sequences[:10]))
    assert len(walked) == 1


@pytest.mark.parametrize("damage", ["truncated", "ids_cut_short", "array_start_inside_ids"])
def test_files_almost_in_our_layout_go_the_checked_way(damage, tmp_path):
    """A file of our writer's, damaged or with ids that look like an array's start, is not trusted whole."""
    looks_like_a_start = np.frombuffer(token_data._ARRAY_START + b"\x05\x00\x00\x00", np.uint8)
    sequences = [np.uint8([1, 2, 3]), looks_like_a_start, np.uint8([9])]
    path = tmp_path / "data.pickle"
    with open(path, "wb") as handle:
        dump_token_id_arrays(sequences, handle)
    raw = path.read_bytes()
    if damage == "array_start_inside_ids":  # a genuine file: it loads, the slow way
        assert not token_data._is_written_here(raw)
        assert [seq.tolist() for seq in load_token_id_arrays(path)] == [seq.tolist() for seq in sequences]
        return
    if damage == "truncated":
        path.write_bytes(raw[:-10])
    else:  # the last array declares 1000 more bytes than follow it
        at = raw.rindex(b"\x01\x00\x00\x00\x09tb")
        path.write_bytes(raw[:at] + struct.pack("<I", 1001) + raw[at + 4 :])
    with pytest.raises(TokenDataError, match="is not a list of token id arrays: .*(truncated|declares 1001 bytes)"):
        load_token_id_arrays(path)
