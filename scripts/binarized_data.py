"""Binarize a text corpus: each line becomes one array of token ids, wrapped in the tokenizer's
start and end markers, ready for train.py.

Output: `{dump_file}.{tokenizer name}.pickle`, a pickled list of 1-D numpy arrays (uint16 when the
vocabulary, added tokens included, has fewer than 65,536 entries, else int32), one per non-blank
line, in shuffled order.

With `--format mmap`, for corpora larger than memory or trained on by many processes per machine:
`{dump_file}.{tokenizer name}.ids.npy`, `.offsets.npy` and `.order.npy` (the layout is in
token_data.py), written as the lines are encoded, so memory holds a few batches however large the
input; train.py and token_counts.py take the `.ids.npy` file as --data_file and memory-map it.

Usage (the original README's command):
    python scripts/binarized_data.py --file_path data/dump.txt --tokenizer_type bert \\
        --tokenizer_name bert-base-uncased --dump_file data/binarized_text
A local tokenizer directory works too; only its last path component goes into the output name:
    python scripts/binarized_data.py --file_path data/dump.txt --tokenizer_type roberta \\
        --tokenizer_name /models/my-roberta --dump_file data/binarized_text --seed 0 --workers 4
A corpus larger than memory (writes data/binarized_text.bert-base-uncased.ids.npy, .offsets.npy, .order.npy):
    python scripts/binarized_data.py --file_path data/dump.txt --tokenizer_type bert \\
        --tokenizer_name bert-base-uncased --dump_file data/binarized_text --format mmap --workers 8
Any other family: each line gets exactly the special tokens its tokenizer adds itself (ModernBERT:
[CLS] ... [SEP]; Llama 3: <|begin_of_text|> ... only; Qwen, GPT-NeoX: nothing, so sequences carry no
boundary marker, and a warning says so):
    python scripts/binarized_data.py --file_path data/dump.txt --tokenizer_type auto \\
        --tokenizer_name meta-llama/Llama-3.2-1B --dump_file data/binarized_text
"""

import argparse
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from itertools import chain, islice
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from cli_flags import ArgumentParser, non_negative_int, positive_int
from cli_utils import (
    HUB_OFFLINE_HINT, ScriptError, atomic_output, atomic_outputs, bounded_map, check_output_path, run_cli,
)
from file_safety import bounded_lines, check_outputs_apart, has_text
from token_data import MMAP_SUFFIX, dump_token_id_arrays, mmap_files

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("binarized_data")

# Which special tokens wrap a line, per tokenizer family: [CLS] ... [SEP], <s> ... </s>,
# <|endoftext|> ... <|endoftext|>. The `auto` type has no entry: its tokenizer adds its own.
AUTO = "auto"
MARKER_ROLES = {
    "bert": ("cls_token", "sep_token"),
    "roberta": ("bos_token", "eos_token"),
    "gpt2": ("bos_token", "eos_token"),
}

# Python decodes undecodable bytes to these lone surrogates under errors="surrogateescape";
# valid UTF-8 never produces them.
# A longer line is refused, not held in memory (a file without line breaks): split such text into lines.
MAX_LINE_CHARS = 64 << 20
_UNDECODABLE = re.compile("[\udc80-\udcff]")

# What --format writes after `{dump_file}.{tokenizer name}`.
FORMAT_SUFFIXES = {"pickle": ".pickle", "mmap": MMAP_SUFFIX}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Tokenize a text file (one sequence per line) into a pickled list of token id arrays.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--file_path", default="data/dump.txt", help="UTF-8 text, one sequence per line.")
    parser.add_argument(
        "--tokenizer_type", default="bert", choices=[*sorted(MARKER_ROLES), AUTO],
        help="Tokenizer family, which picks the markers: [CLS] ... [SEP] (bert), <s> ... </s> (roberta), "
        "<|endoftext|> ... <|endoftext|> (gpt2). [+] auto: the special tokens the tokenizer adds itself, "
        "e.g. a BOS only for Llama, none for Qwen.",
    )
    parser.add_argument(
        "--tokenizer_name", default="bert-base-uncased", help="Hub name or local tokenizer directory."
    )
    parser.add_argument(
        "--dump_file", default="data/dump",
        help="Output prefix: writes {dump_file}.{tokenizer name}.pickle (.ids.npy and siblings with --format mmap).",
    )
    parser.add_argument(
        "--format", default="pickle", choices=sorted(FORMAT_SUFFIXES),
        help="[+] pickle: the original's pickled list of arrays, loaded whole by every training process. mmap: "
        "{dump_file}.{tokenizer name}.ids.npy, .offsets.npy and .order.npy, written streaming and memory-mapped "
        "by train.py (one shared copy per machine), for corpora larger than memory or many processes per machine.",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=None,
        help="Seed of the shuffle; without it a fresh seed is drawn and logged so the run can be repeated.",
    )
    parser.add_argument(
        "--workers", type=positive_int, default=1,
        help="Worker processes encoding in parallel (1: encode in this process, the Rust tokenizer still "
        "uses every core).",
    )
    parser.add_argument("--batch_size", type=positive_int, default=10_000, help="Lines per batched tokenizer call.")
    return parser


def output_path(dump_file: str, tokenizer_name: str, output_format: str = "pickle") -> Path:
    """`{dump_file}.{name}.pickle` (`.ids.npy` for mmap), where name is the last component of a path or hub name.

    The original used the whole name, so `--tokenizer_name /models/bert` gave a path into a
    folder that does not exist.
    """
    local = Path(tokenizer_name)
    name = local.resolve().name if local.exists() else tokenizer_name.rstrip("/").rsplit("/", 1)[-1]
    return Path(f"{dump_file}.{name}{FORMAT_SUFFIXES[output_format]}")


def ids_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the file and memory when every id fits, else int32."""
    return np.dtype(np.uint16) if vocab_size < 1 << 16 else np.dtype(np.int32)


def check_paths(args: argparse.Namespace) -> None:
    """Fail before the slow work: the input must be a file with text and the output folder must exist."""
    source = Path(args.file_path)
    if not source.is_file():
        raise ScriptError(f"--file_path {args.file_path!r} is not a file")
    if source.stat().st_size == 0:
        raise ScriptError(f"--file_path {args.file_path!r} is empty")
    if not has_text(source):
        raise ScriptError(f"--file_path {args.file_path!r} has no non-blank line")
    target = output_path(args.dump_file, args.tokenizer_name, args.format)
    outputs = mmap_files(target).values() if args.format == "mmap" else [target]
    check_outputs_apart(
        [("--dump_file", output) for output in outputs],
        {"--file_path": args.file_path, "--tokenizer_name": args.tokenizer_name},
    )
    check_output_path("--dump_file", target)


class LineEncoder:
    """Turns a batch of stripped lines into token ids, in this process or in a worker (it pickles).

    Args:
        backend: the Rust `tokenizers.Tokenizer` behind the fast transformers tokenizer.
        markers: the literal start and end markers to wrap each line in, e.g. ("[CLS]", "[SEP]"); None
            lets the tokenizer add its own special tokens instead (`--tokenizer_type auto`).
        dtype: dtype of the ids, see `ids_dtype`.
    """

    def __init__(self, backend: Tokenizer, markers: tuple[str, str] | None, dtype: np.dtype):
        self.backend = backend
        self.markers = markers
        self.dtype = dtype

    def __call__(self, lines: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode `f"{start} {line} {end}"` for every line without letting the tokenizer add markers, or,
        without markers, every bare line with the special tokens the tokenizer adds.

        Returns:
            ids: (n_tokens,) ids of all lines, one after the other.
            lengths: (len(lines),) number of ids of each line.
        """
        if self.markers is None:
            texts, add_special_tokens = lines, True
        else:
            start, end = self.markers
            texts, add_special_tokens = [f"{start} {line} {end}" for line in lines], False
        # encode_batch_fast skips the character offsets we do not need; one call per batch lets
        # the Rust side spread the lines over every core.
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        id_lists = [encoding.ids for encoding in encodings]
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        ids = np.fromiter(chain.from_iterable(id_lists), dtype=self.dtype, count=int(lengths.sum()))
        return ids, lengths


class LineChunks:
    """Streams the stripped, non-blank lines of a UTF-8 file in lists of at most `chunk_size` lines.

    The file is never read whole: chunks are read as they are consumed. Counts lines read, blank
    lines skipped and bytes read (for progress, to within the read buffer); an undecodable line is
    a ScriptError naming its line number.
    """

    def __init__(self, path: str | os.PathLike, chunk_size: int):
        self.path = Path(path)
        self.chunk_size = chunk_size
        self.n_lines = 0
        self.n_blank = 0
        self.bytes_read = 0

    def __iter__(self) -> Iterator[list[str]]:
        # Text mode, as the original: \n, \r\n and \r all end a line. Strict decoding checks the
        # text at no cost; only a file that fails is read again, to find the line.
        with open(self.path, encoding="utf-8") as handle:
            lines_read = bounded_lines(handle, MAX_LINE_CHARS, f"--file_path {str(self.path)!r}")
            try:
                while raw := list(islice(lines_read, self.chunk_size)):
                    self.n_lines += len(raw)
                    self.bytes_read = handle.buffer.tell()
                    lines = [line for line in map(str.strip, raw) if line]
                    self.n_blank += len(raw) - len(lines)
                    if lines:
                        yield lines
            except UnicodeDecodeError:
                raise ScriptError(f"{str(self.path)!r} line {undecodable_line(self.path)} is not valid UTF-8") from None


def undecodable_line(path: Path) -> int:
    """The number of the first line of `path` that is not valid UTF-8 (which must exist)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        return next(number for number, line in enumerate(handle, start=1) if _UNDECODABLE.search(line))


def load_tokenizer(name: str) -> "PreTrainedTokenizerBase":
    """The fast tokenizer of a hub name or a local directory; any failure becomes a one-line ScriptError.

    A tokenizer.json is loaded by the generic fast class: AutoTokenizer would first import torch
    (seconds of start-up) to read the model's config. Only a tokenizer without one goes through
    AutoTokenizer, which converts it from its model-specific files.
    """
    try:
        tokenizer = _fast_or_auto_tokenizer(name)
    # transformers reports "not a tokenizer" as OSError, ValueError, KeyError... depending on what is missing.
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "" if Path(name).exists() else f"; {HUB_OFFLINE_HINT}"
        raise ScriptError(f"--tokenizer_name {name!r} could not be loaded as a tokenizer: {first_line}{hint}") from err
    if not getattr(tokenizer, "is_fast", False):
        raise ScriptError(f"--tokenizer_name {name!r} has no fast (Rust) tokenizer, which batched encoding needs")
    return tokenizer


def _fast_or_auto_tokenizer(name: str) -> "PreTrainedTokenizerBase":
    """The generic fast class when `name` has a tokenizer.json, AutoTokenizer otherwise."""
    # Imported here: worker processes re-import this module and only need the Rust tokenizer.
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(name)
    except Exception:  # no tokenizer.json (or not a tokenizer at all: AutoTokenizer then says why)
        from transformers import AutoTokenizer  # imports torch: only on this path

        return AutoTokenizer.from_pretrained(name)


def marker_tokens(tokenizer: "PreTrainedTokenizerBase", tokenizer_type: str) -> tuple[str, str]:
    """The literal start and end markers of `tokenizer_type`, checked to be single special tokens."""
    markers = []
    for role in MARKER_ROLES[tokenizer_type]:
        token = getattr(tokenizer, role, None)
        if token is None:
            raise ScriptError(f"the tokenizer has no {role}; is --tokenizer_type {tokenizer_type} right?")
        # Otherwise "[CLS]" would be split into pieces and training would reject every sequence.
        if tokenizer.backend_tokenizer.encode(str(token), add_special_tokens=False).ids != [
            tokenizer.convert_tokens_to_ids(str(token))
        ]:
            raise ScriptError(f"the tokenizer does not encode its {role} {str(token)!r} as one special token")
        markers.append(str(token))
    return markers[0], markers[1]


def log_own_markers(tokenizer: "PreTrainedTokenizerBase") -> None:
    """`--tokenizer_type auto`: say which special tokens the tokenizer wraps a line in; warn when it adds none."""
    from model_families import added_markers  # imports torch: only on this path, never in the workers

    try:
        added = added_markers(tokenizer)
    except ValueError as err:
        raise ScriptError(f"--tokenizer_type auto: {err}") from err
    if added == (None, None):
        logger.warning(
            "The tokenizer adds no special token: each sequence is the bare ids of its line and carries no "
            "boundary marker (no start or end token)"
        )
        return
    start, end = ("none" if idx is None else repr(tokenizer.convert_ids_to_tokens(idx)) for idx in added)
    logger.info("Lines get the special tokens the tokenizer adds itself: start %s, end %s", start, end)


_worker_encoder: LineEncoder | None = None


def _install_encoder(encoder: LineEncoder) -> None:
    """Worker initializer: receive the encoder (and its tokenizer) once, not with every batch."""
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _worker_encoder(lines)


def make_executor(encoder: LineEncoder, workers: int) -> tuple[Executor, Callable, int]:
    """An executor, the function to submit to it and how many calls it runs at once.

    One worker: two threads in this process, so that converting one batch to arrays overlaps the
    Rust encoding of the next (which releases the GIL and spreads over every core itself). More:
    worker processes, started with "spawn" so that none is forked from a parent holding threads.
    """
    if workers == 1:
        return ThreadPoolExecutor(max_workers=2), encoder, 2
    executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_install_encoder, initargs=(encoder,)
    )
    return executor, _encode_in_worker, workers


def encode_corpus(chunks: LineChunks, encoder: LineEncoder, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encode every chunk, in order, with a progress bar over the bytes of the input.

    Yields:
        ids: the (n_tokens,) ids of a chunk's lines one after the other.
        lengths: the (n_lines,) number of ids of each line of the chunk.
    """
    executor, fn, parallel = make_executor(encoder, workers)
    with executor, tqdm(total=chunks.path.stat().st_size, unit="B", unit_scale=True, desc="binarizing") as bar:
        # Two batches per worker in flight: none waits for work, and memory stays a few batches.
        for ids, lengths in bounded_map(executor, fn, chunks, depth=2 * parallel):
            bar.update(chunks.bytes_read - bar.n)
            yield ids, lengths


def split_lines(ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """The (n_tokens,) `ids` of a chunk cut into one array per line, of the (n_lines,) `lengths`.

    The arrays are views into the chunk's buffer: no copy, and pickling a view writes only its own ids.
    """
    ends = np.cumsum(lengths).tolist()
    return [ids[begin:end] for begin, end in zip([0, *ends[:-1]], ends)]


def shuffle_order(n_sequences: int, seed: int) -> np.ndarray:
    """The (n_sequences,) permutation fixed by `seed`: the pickle's order, and what the mmap format stores."""
    return np.random.default_rng(seed).permutation(n_sequences)


class NpyAppender:
    """A 1-D .npy file written piece by piece, its length put in the header when it is closed.

    numpy pads a header so that the length can grow to 21 digits without moving the data (what
    np.lib.format does for files that grow), so the final header overwrites the first in place.

    Args:
        handle: a binary file open for writing, at its start.
        dtype: dtype of the array; appended pieces are converted to it.
    """

    def __init__(self, handle: BinaryIO, dtype: np.dtype):
        self.handle = handle
        self.dtype = np.dtype(dtype)
        self.size = 0
        self._header_size = self._write_header()

    def append(self, values: np.ndarray) -> None:
        """Write (n,) `values` after what is already there."""
        self.handle.write(np.ascontiguousarray(values, dtype=self.dtype).data)
        self.size += len(values)

    def finish(self) -> None:
        """Rewrite the header with the final length; the file is complete once the handle is closed."""
        self.handle.seek(0)
        header_size = self._write_header()
        assert header_size == self._header_size, f"the .npy header grew from {self._header_size} to {header_size} bytes"
        self.handle.seek(0, os.SEEK_END)

    def _write_header(self) -> int:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.size,)}
        np.lib.format.write_array_header_1_0(self.handle, header)
        return self.handle.tell()


class MmapWriter:
    """Writes binarized data in the memory-mapped format (layout in token_data.py) as it comes.

    The ids and offsets go to their files chunk by chunk, so memory holds one chunk however large
    the corpus; the order (the shuffle, one int64 per sequence) is written by `finish`.

    Args:
        handles: binary files open for writing, {"ids": ..., "offsets": ..., "order": ...}.
        dtype: dtype of the ids, see `ids_dtype`.
    """

    def __init__(self, handles: dict[str, BinaryIO], dtype: np.dtype):
        self.ids = NpyAppender(handles["ids"], dtype)
        self.offsets = NpyAppender(handles["offsets"], np.dtype(np.int64))
        self.offsets.append(np.zeros(1, dtype=np.int64))
        self.order_handle = handles["order"]

    @property
    def n_sequences(self) -> int:
        return self.offsets.size - 1

    def append(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Add sequences: (n_tokens,) `ids` of all of them one after the other, (n,) `lengths` of each."""
        self.offsets.append(self.ids.size + np.cumsum(lengths, dtype=np.int64))
        self.ids.append(ids)

    def finish(self, order: np.ndarray) -> None:
        """Write the (n_sequences,) permutation to train in and complete the headers."""
        if len(order) != self.n_sequences:
            raise ValueError(f"an order of {len(order)} sequences for {self.n_sequences} sequences")
        np.lib.format.write_array(self.order_handle, np.asarray(order, dtype=np.int64))
        self.ids.finish()
        self.offsets.finish()


@contextmanager
def mmap_output(ids_path: str | os.PathLike, dtype: np.dtype) -> Iterator[MmapWriter]:
    """An MmapWriter into temporary files beside the three of `ids_path`, renamed to them if the block completes.

    On an error all three temporary files are removed and earlier files under the final names stay
    untouched; the three are renamed only once all are written.
    """
    files = mmap_files(ids_path)
    with atomic_outputs(list(files.values())) as tmps, ExitStack() as stack:
        handles = {part: stack.enter_context(open(tmp, "wb")) for part, tmp in zip(files, tmps)}
        yield MmapWriter(handles, dtype)  # the handles close before the files are renamed


def write_pickle(encoded: Iterable[tuple[np.ndarray, np.ndarray]], target: Path, seed: int) -> tuple[int, int]:
    """Collect every encoded chunk, shuffle with `seed` and pickle the list of arrays to `target`, atomically.

    Returns:
        The number of sequences and of tokens written.
    """
    sequences, n_tokens = [], 0
    for ids, lengths in encoded:  # cut as they come, while the next chunks are being encoded
        sequences += split_lines(ids, lengths)
        n_tokens += ids.size
    with atomic_output(target) as tmp, open(tmp, "wb") as handle:
        dump_token_id_arrays([sequences[i] for i in shuffle_order(len(sequences), seed).tolist()], handle)
    return len(sequences), n_tokens


def write_mmap(
    encoded: Iterable[tuple[np.ndarray, np.ndarray]], target: Path, seed: int, dtype: np.dtype
) -> tuple[int, int]:
    """Stream every encoded chunk to the memory-mapped format at `target`, atomically, shuffled with `seed`.

    The shuffle is the pickle's (same seed, same order of sequences), stored as a permutation: the
    ids stay in the order they were read.

    Returns:
        The number of sequences and of tokens written.
    """
    with mmap_output(target, dtype) as writer:
        for ids, lengths in encoded:
            writer.append(ids, lengths)
        writer.finish(shuffle_order(writer.n_sequences, seed))
    return writer.n_sequences, writer.ids.size


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logger.info("Arguments: %s", vars(args))
    check_paths(args)
    tokenizer = load_tokenizer(args.tokenizer_name)
    if args.tokenizer_type == AUTO:
        log_own_markers(tokenizer)
        markers = None
    else:
        markers = marker_tokens(tokenizer, args.tokenizer_type)
        logger.info("Lines become %r ... %r", *markers)
    dtype = ids_dtype(len(tokenizer))
    logger.info("%d tokens in the vocabulary: ids are %s", len(tokenizer), dtype)
    encoder = LineEncoder(tokenizer.backend_tokenizer, markers, dtype)
    seed = secrets.randbits(32) if args.seed is None else args.seed
    logger.info("Shuffling with seed %d%s", seed, "" if args.seed is not None else f"; --seed {seed} repeats it")

    target = output_path(args.dump_file, args.tokenizer_name, args.format)
    began = time.perf_counter()
    chunks = LineChunks(args.file_path, args.batch_size)
    # closing(): on an error the workers stop now, not when the generator is collected.
    with closing(encode_corpus(chunks, encoder, args.workers)) as encoded:
        if args.format == "mmap":
            n_sequences, n_tokens = write_mmap(encoded, target, seed, dtype)
        else:
            n_sequences, n_tokens = write_pickle(encoded, target, seed)
    elapsed = time.perf_counter() - began
    logger.info(
        "%d lines read, %d blank lines skipped, %d sequences, %d tokens, in %.1fs (%.0f lines/s)",
        chunks.n_lines, chunks.n_blank, n_sequences, n_tokens, elapsed, chunks.n_lines / elapsed,
    )
    logger.info("Wrote %d sequences to %s", n_sequences, target)


if __name__ == "__main__":
    run_cli(main)
