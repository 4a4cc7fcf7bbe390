"""scripts/binarized_data.py: ids, dtype, output name, shuffle and errors, through the real CLI.

The CLI runs are started together in one module fixture (each pays a few seconds of imports) and
run from a folder that is not the repository, to prove the script works from anywhere.
"""

import io
import logging
import pickle
import pickletools
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import binarized_data
from binarized_data import ids_dtype, output_path
from cli_checks import assert_one_line_error
from cli_utils import ScriptError
from token_data import dump_token_id_arrays, load_token_id_arrays

# Written out here, not taken from the script: what each family's lines must be wrapped in.
MARKERS = {"bert": ("[CLS]", "[SEP]"), "roberta": ("<s>", "</s>"), "gpt2": ("<|endoftext|>", "<|endoftext|>")}
BLANK_LINES = ["", "   ", "\t"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, corpus_lines) -> Path:
    """The corpus with blank lines mixed in, padding spaces around some lines and CRLF endings."""
    path = tmp_path_factory.mktemp("text") / "dump.txt"
    lines = []
    for i, line in enumerate(corpus_lines):
        lines.append(f"  {line} " if i % 7 == 0 else line)
        if i % 50 == 0:
            lines.extend(BLANK_LINES)
    path.write_bytes("\r\n".join(lines).encode("utf-8") + b"\r\n")
    return path


@pytest.fixture(scope="module")
def big_vocab_tokenizer(tmp_path_factory) -> Path:
    """A BERT-style tokenizer of 65,000 base entries plus 600 added tokens: only the added tokens
    take it past 65,536, which is what must switch the ids to int32."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(65_000 - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tokenizer.add_tokens([f"added{i}" for i in range(600)])
    out_dir = tmp_path_factory.mktemp("tokenizers") / "big-vocab"
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_bad_utf8(path: Path, good_lines: list[str]) -> Path:
    """Valid lines, then a line with a byte that is not UTF-8 at line len(good_lines) + 1."""
    path.write_bytes("\n".join(good_lines).encode() + b"\ncaf\xe9 au lait\nmore text\n")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, repo_root, tokenizer_dirs, text_file, big_vocab_tokenizer, corpus_lines):
    """Start every CLI case at once, wait for all; {case: (CompletedProcess, output folder)}.

    A case without its own folder reads the shared text file and writes to a fresh folder; flags
    given in the case come later on the command line, so they win.
    """
    root = tmp_path_factory.mktemp("runs")
    cwd = tmp_path_factory.mktemp("elsewhere")
    not_a_tokenizer = root / "not-a-tokenizer"
    not_a_tokenizer.mkdir()
    (not_a_tokenizer / "notes.txt").write_text("no tokenizer here\n")
    inputs = root / "inputs"
    inputs.mkdir()
    (inputs / "empty.txt").write_bytes(b"")
    (inputs / "blank.txt").write_text("\n  \n\t\n")
    write_bad_utf8(inputs / "bad.txt", corpus_lines[:30])
    (inputs / "big.txt").write_text("w1 w2 added599 w64994\nw7 added0\n")

    # The README form, with relative paths, run from a folder holding data/.
    (cwd / "data").mkdir()
    (cwd / "data" / "dump.txt").write_bytes(text_file.read_bytes())
    bert = tokenizer_dirs["bert"]
    cases = {
        "bert": (cwd / "data", ["--file_path", "data/dump.txt", "--tokenizer_type", "bert", "--tokenizer_name",
                                str(bert), "--dump_file", "data/binarized_text", "--seed", "0", "--workers", "2",
                                "--batch_size", "64"]),
        "roberta": (None, ["--tokenizer_type", "roberta", "--tokenizer_name", str(tokenizer_dirs["roberta"]) + "/",
                           "--seed", "0"]),
        "gpt2": (None, ["--tokenizer_type", "gpt2", "--tokenizer_name", str(tokenizer_dirs["gpt2"]), "--seed", "0"]),
        "big": (None, ["--file_path", str(inputs / "big.txt"), "--tokenizer_name", str(big_vocab_tokenizer)]),
        "missing": (None, ["--file_path", str(inputs / "nope.txt"), "--tokenizer_name", str(bert)]),
        "empty": (None, ["--file_path", str(inputs / "empty.txt"), "--tokenizer_name", str(bert)]),
        "blank": (None, ["--file_path", str(inputs / "blank.txt"), "--tokenizer_name", str(bert)]),
        "bad_utf8": (None, ["--file_path", str(inputs / "bad.txt"), "--tokenizer_name", str(bert),
                            "--batch_size", "8"]),
        "not_a_tokenizer": (None, ["--tokenizer_name", str(not_a_tokenizer)]),
        "no_output_folder": (None, ["--tokenizer_name", str(bert), "--dump_file", str(root / "nowhere" / "x")]),
    }
    started = {}
    for case, (out_dir, args) in cases.items():
        if out_dir is None:
            out_dir = root / case
            out_dir.mkdir()
            args = ["--file_path", str(text_file), "--dump_file", str(out_dir / "binarized_text"), *args]
        # The bad-UTF-8 run must also leave an existing output file alone.
        if case == "bad_utf8":
            (out_dir / "binarized_text.tiny-bert.pickle").write_bytes(b"previous run")
        command = [sys.executable, str(repo_root / "scripts" / "binarized_data.py"), *args]
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started[case] = (process, out_dir)
    results = {}
    for case, (process, out_dir) in started.items():
        stdout, stderr = process.communicate(timeout=120)
        results[case] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), out_dir)
    return results


def load_output(out_dir: Path) -> list[np.ndarray]:
    (path,) = out_dir.glob("*.pickle")
    with open(path, "rb") as handle:
        return pickle.load(handle)


def expected_ids(tokenizer_dir: Path, kind: str, lines: list[str]) -> list[list[int]]:
    """The tokenizer's own encoding of every wrapped line, one call per line."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start, end = MARKERS[kind]
    return [tokenizer.encode(f"{start} {line.strip()} {end}", add_special_tokens=False) for line in lines]


@pytest.mark.parametrize("kind", sorted(MARKERS))
def test_ids_are_the_tokenizers_encoding_of_every_wrapped_line(runs, kind, tokenizer_dirs, corpus_lines):
    result, out_dir = runs[kind]
    assert result.returncode == 0, result.stderr
    sequences = load_output(out_dir)
    expected = expected_ids(tokenizer_dirs[kind], kind, corpus_lines)
    assert all(isinstance(seq, np.ndarray) and seq.ndim == 1 and seq.dtype == np.uint16 for seq in sequences)
    # Same multiset of sequences: every line exactly once, blank lines dropped ...
    assert sorted(map(tuple, map(np.ndarray.tolist, sequences))) == sorted(map(tuple, expected))
    # ... in a shuffled order.
    assert [seq.tolist() for seq in sequences] != expected


def test_blank_lines_are_skipped_and_counted(runs, corpus_lines):
    result, _ = runs["roberta"]
    n_blank = len(BLANK_LINES) * len(range(0, len(corpus_lines), 50))
    assert f"{len(corpus_lines) + n_blank} lines read, {n_blank} blank lines skipped" in result.stderr


def test_output_name_uses_the_last_component_of_a_local_path(runs):
    result, out_dir = runs["bert"]
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["binarized_text.tiny-bert.pickle", "dump.txt"]
    _, roberta_dir = runs["roberta"]  # given with a trailing slash
    assert [p.name for p in roberta_dir.iterdir()] == ["binarized_text.tiny-roberta.pickle"]


def test_output_path_rule():
    assert output_path("data/dump", "bert-base-uncased") == Path("data/dump.bert-base-uncased.pickle")
    assert output_path("data/x", "openai-community/gpt2") == Path("data/x.gpt2.pickle")
    assert output_path("data/x", "/no/such/dir/my-tok/") == Path("data/x.my-tok.pickle")


def test_dtype_rule():
    assert ids_dtype(30522) == np.uint16
    assert ids_dtype(65535) == np.uint16
    assert ids_dtype(65536) == np.int32
    assert ids_dtype(250_002) == np.int32


def test_added_tokens_count_for_the_dtype(runs, big_vocab_tokenizer):
    result, out_dir = runs["big"]
    assert result.returncode == 0, result.stderr
    sequences = load_output(out_dir)
    assert {seq.dtype for seq in sequences} == {np.dtype(np.int32)}
    # [CLS]=2 w1=6 w2=7 added599=65599 w64994=64999 [SEP]=3: the id above 65535 survives intact.
    assert sorted(seq.tolist() for seq in sequences) == [[2, 6, 7, 65599, 64999, 3], [2, 12, 65000, 3]]


def test_same_seed_same_order_across_processes_and_worker_counts(runs, text_file, tokenizer_dirs, tmp_path):
    # The CLI run used 2 workers and batches of 64 lines; this one encodes in-process in one batch.
    _, cli_dir = runs["bert"]
    binarized_data.main([
        "--file_path", str(text_file), "--tokenizer_name", str(tokenizer_dirs["bert"]),
        "--dump_file", str(tmp_path / "again"), "--seed", "0",
    ])
    again = load_output(tmp_path)
    assert [seq.tolist() for seq in again] == [seq.tolist() for seq in load_output(cli_dir)]


def test_other_seed_or_no_seed_gives_another_permutation(text_file, tokenizer_dirs, tmp_path):
    orders = {}
    for name, seed_args in {"seed0": ["--seed", "0"], "seed1": ["--seed", "1"], "none_a": [], "none_b": []}.items():
        out_dir = tmp_path / name
        out_dir.mkdir()
        binarized_data.main([
            "--file_path", str(text_file), "--tokenizer_name", str(tokenizer_dirs["bert"]),
            "--dump_file", str(out_dir / "b"), *seed_args,
        ])
        orders[name] = [tuple(seq.tolist()) for seq in load_output(out_dir)]
    assert orders["seed0"] != orders["seed1"]
    assert orders["none_a"] != orders["none_b"]
    assert all(sorted(order) == sorted(orders["seed0"]) for order in orders.values())


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("missing", ["nope.txt", "is not a file"]),
        ("empty", ["empty.txt", "is empty"]),
        ("blank", ["blank.txt", "no non-blank line"]),
        ("bad_utf8", ["bad.txt", "line 31", "UTF-8"]),
        ("not_a_tokenizer", ["not-a-tokenizer", "could not be loaded as a tokenizer"]),
        ("no_output_folder", ["nowhere", "does not exist"]),
    ],
)
def test_bad_input_is_a_one_line_error_and_leaves_no_output(runs, case, fragments):
    result, out_dir = runs[case]
    assert_one_line_error(result, *fragments)
    leftovers = sorted(p.name for p in out_dir.iterdir())
    # Nothing new and no temporary file; the earlier output of the bad-UTF-8 case is untouched.
    if case == "bad_utf8":
        assert leftovers == ["binarized_text.tiny-bert.pickle"]
        assert (out_dir / leftovers[0]).read_bytes() == b"previous run"
    else:
        assert leftovers == []


def test_markers_the_tokenizer_lacks_are_an_error(text_file, tokenizer_dirs, tmp_path):
    with pytest.raises(ScriptError, match="no bos_token; is --tokenizer_type gpt2 right"):
        binarized_data.main([
            "--file_path", str(text_file), "--tokenizer_type", "gpt2", "--tokenizer_name", str(tokenizer_dirs["bert"]),
            "--dump_file", str(tmp_path / "b"),
        ])
    assert list(tmp_path.iterdir()) == []


def test_line_chunks_read_multibyte_text_across_buffers(tmp_path):
    expected = [f"café ☕ naïve {i}" for i in range(3000)]
    path = tmp_path / "text.txt"
    path.write_bytes("".join(f" {line} \r\n\n" for line in expected).encode())
    chunks = binarized_data.LineChunks(path, chunk_size=128)
    assert [line for chunk in chunks for line in chunk] == expected
    assert (chunks.n_lines, chunks.n_blank) == (6000, 3000)


@pytest.mark.parametrize("tail, bad_line", [(b"caf\xe9 au lait\nfine\n", 2501), (b"fine\r\nends in caf\xc3", 2502)])
def test_line_chunks_name_the_first_line_that_is_not_utf8(tmp_path, tail, bad_line):
    """Far past the first read buffer and chunk, with \\r line ends, or cut inside a character at the end."""
    path = tmp_path / "text.txt"
    path.write_bytes(b"".join(f"line number {i}\r".encode() for i in range(2500)) + tail)
    with pytest.raises(ScriptError, match=f"line {bad_line} is not valid UTF-8"):
        list(binarized_data.LineChunks(path, chunk_size=100))


def test_pickle_writer_gives_what_numpys_own_pickles_give(tmp_path):
    """dump_token_id_arrays' file is a well-formed pickle that plain pickle and the safe reader load into
    the arrays numpy's own pickles give: mixed dtypes and byte orders, empty and long arrays, and
    more arrays than one written batch."""
    flat = np.arange(70_000, dtype=np.int32)
    odd = [flat[5:9], np.uint16([2, 7, 3]), flat[:0], flat[65_530:65_540], flat[:300], np.arange(4, dtype=">u2")]
    sequences = odd + np.split(np.arange(60_000, dtype=np.uint16) % 30_522, np.arange(3, 60_000, 4)) + odd
    path = tmp_path / "data.pickle"
    with open(path, "wb") as handle:
        dump_token_id_arrays(sequences, handle)
    pickletools.dis(path.read_bytes(), out=io.StringIO())  # raises on a malformed opcode stream or stack
    expected = [(a.dtype, a.tolist(), a.flags.writeable) for a in pickle.loads(pickle.dumps(sequences, protocol=4))]
    for loaded in (pickle.loads(path.read_bytes()), load_token_id_arrays(path)):
        assert [(a.dtype, a.tolist(), a.flags.writeable) for a in loaded] == expected


def test_pickle_writer_refuses_arrays_that_are_not_integers(tmp_path):
    with open(tmp_path / "data.pickle", "wb") as handle, pytest.raises(ValueError, match="must be integers"):
        dump_token_id_arrays([np.uint16([1, 2]), np.float32([0.5])], handle)


def test_output_path_of_the_memory_mapped_format():
    assert output_path("data/dump", "bert-base-uncased", "mmap") == Path("data/dump.bert-base-uncased.ids.npy")
    assert output_path("data/x", "/no/such/dir/my-tok/", "mmap") == Path("data/x.my-tok.ids.npy")


def test_npy_appender_writes_a_file_numpy_loads(tmp_path):
    path = tmp_path / "grown.npy"
    with open(path, "wb") as handle:
        appender = binarized_data.NpyAppender(handle, np.dtype(np.int32))
        for piece in (np.arange(5), np.array([], dtype=np.int64), np.arange(70_000, 70_003)):
            appender.append(piece)
        appender.finish()
    loaded = np.load(path, mmap_mode="r")
    assert loaded.dtype == np.int32 and loaded.tolist() == [0, 1, 2, 3, 4, 70_000, 70_001, 70_002]


def test_npy_header_keeps_its_size_up_to_the_largest_lengths(tmp_path):
    with open(tmp_path / "header.npy", "wb") as handle:
        appender = binarized_data.NpyAppender(handle, np.dtype(np.uint16))
        appender.size = 10**20  # a length of 21 digits: the header is rewritten in place (it asserts so)
        appender.finish()


def test_a_tokenizer_json_loads_without_importing_torch(tokenizer_dirs):
    """AutoTokenizer would import torch to read the model config: seconds of start-up per run."""
    probe = (
        "import sys, binarized_data; "
        f"tokenizer = binarized_data.load_tokenizer({str(tokenizer_dirs['roberta'])!r}); "
        "print(tokenizer.mask_token, 'torch' in sys.modules)"
    )
    scripts = Path(binarized_data.__file__).parent
    result = subprocess.run([sys.executable, "-c", probe], cwd=scripts, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["<mask>", "False"]


def test_a_tokenizer_without_tokenizer_json_goes_through_autotokenizer(tokenizer_dirs, corpus_lines, tmp_path):
    """A BERT vocab.txt alone, as older hub repositories have: the generic fast class cannot build it,
    AutoTokenizer can."""
    import json

    from transformers import BertTokenizer

    vocab = AutoTokenizer.from_pretrained(tokenizer_dirs["bert"]).get_vocab()
    (tmp_path / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    tokenizer = binarized_data.load_tokenizer(str(tmp_path))
    reference = BertTokenizer(vocab=vocab)
    assert type(tokenizer) is BertTokenizer
    for line in corpus_lines[:20]:
        assert tokenizer.backend_tokenizer.encode(line).ids == reference.backend_tokenizer.encode(line).ids


# ------------------------------------------------- --tokenizer_type auto: the tokenizer's own special tokens

# What each tokenizer must wrap a line in, by token name, written out here (None: nothing on that side).
AUTO_WRAPPING = {
    "bert": ("[CLS]", "[SEP]"),
    "modernbert": ("[CLS]", "[SEP]"),
    "llama": ("<|begin_of_text|>", None),
    "qwen3": (None, None),
}


@contextmanager
def captured_log(name: str) -> Iterator[list[str]]:
    """The `LEVEL: message` lines logger `name` emits at INFO and above inside the block."""
    logger = logging.getLogger(name)
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(f"{record.levelname}: {record.getMessage()}")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def auto_runs(tmp_path_factory, text_file, tokenizer_dirs, auto_tokenizer_dirs) -> dict[str, tuple[Path, str]]:
    """binarized_data.main with --tokenizer_type auto per tokenizer, in this process: {kind: (output folder, log)}.

    The Llama case runs two worker processes over small batches, which receive the encoder by pickling.
    """
    dirs = {"bert": tokenizer_dirs["bert"], **auto_tokenizer_dirs}
    results = {}
    for kind in AUTO_WRAPPING:
        out_dir = tmp_path_factory.mktemp(f"auto-{kind}")
        flags = ["--workers", "2", "--batch_size", "64"] if kind == "llama" else []
        with captured_log("binarized_data") as log:
            binarized_data.main([
                "--file_path", str(text_file), "--tokenizer_type", "auto", "--tokenizer_name", str(dirs[kind]),
                "--dump_file", str(out_dir / "binarized_text"), "--seed", "0", *flags,
            ])
        results[kind] = (out_dir, "\n".join(log))
    return results


@pytest.mark.parametrize("kind", sorted(AUTO_WRAPPING))
def test_auto_ids_are_the_tokenizers_own_encoding_of_every_line(
    kind, auto_runs, tokenizer_dirs, auto_tokenizer_dirs, corpus_lines
):
    out_dir, _ = auto_runs[kind]
    tokenizer_dir = {"bert": tokenizer_dirs["bert"], **auto_tokenizer_dirs}[kind]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    expected = [tokenizer(line.strip()).input_ids for line in corpus_lines]

    assert [p.name for p in out_dir.iterdir()] == [f"binarized_text.{tokenizer_dir.name}.pickle"]
    sequences = load_output(out_dir)
    assert all(seq.dtype == np.uint16 for seq in sequences)
    assert sorted(tuple(seq.tolist()) for seq in sequences) == sorted(map(tuple, expected))
    # The wrapping, by name: exactly the family's markers, nothing else special.
    start, end = AUTO_WRAPPING[kind]
    special = set(tokenizer.all_special_ids)
    for seq in sequences:
        body = seq.tolist()[(start is not None) : len(seq) - (end is not None)]
        assert start is None or tokenizer.convert_ids_to_tokens(int(seq[0])) == start
        assert end is None or tokenizer.convert_ids_to_tokens(int(seq[-1])) == end
        assert not special & set(body)


def test_auto_warns_when_the_tokenizer_adds_no_marker(auto_runs):
    no_marker = "WARNING: The tokenizer adds no special token: each sequence is the bare ids of its line"
    assert no_marker in auto_runs["qwen3"][1]
    assert "WARNING" not in auto_runs["llama"][1]
    assert "special tokens the tokenizer adds itself: start '<|begin_of_text|>', end none" in auto_runs["llama"][1]


def test_auto_refuses_a_tokenizer_adding_two_markers_on_a_side(text_file, tmp_path):
    backend = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> <s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    tokenizer_dir = tmp_path / "double-bos"
    tokenizer.save_pretrained(tokenizer_dir)
    with pytest.raises(ScriptError, match=r"--tokenizer_type auto: the tokenizer adds 2 special tokens before a text"):
        binarized_data.main([
            "--file_path", str(text_file), "--tokenizer_type", "auto", "--tokenizer_name", str(tokenizer_dir),
            "--dump_file", str(tmp_path / "b"),
        ])
    assert [p.name for p in tmp_path.iterdir()] == ["double-bos"]
