"""Binarize a text corpus: each line becomes one array of token ids, wrapped in the tokenizer's
start and end markers, ready for train.py.

Output: `{dump_file}.{tokenizer name}.pickle`, a pickled list of 1-D numpy arrays (uint16 when the
vocabulary, added tokens included, has fewer than 65,536 entries, else int32), one per non-blank
line, in shuffled order.

Usage (the original README's command):
    python scripts/binarized_data.py --file_path data/dump.txt --tokenizer_type bert \\
        --tokenizer_name bert-base-uncased --dump_file data/binarized_text
A local tokenizer directory works too; only its last path component goes into the output name:
    python scripts/binarized_data.py --file_path data/dump.txt --tokenizer_type roberta \\
        --tokenizer_name /models/my-roberta --dump_file data/binarized_text --seed 0 --workers 4
"""

import argparse
import logging
import os
import pickle
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from itertools import chain, islice
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy._core import multiarray as np_multiarray  # _reconstruct: what numpy's pickles call
from tokenizers import Tokenizer
from tqdm import tqdm

from cli_utils import ScriptError, atomic_output, run_cli

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("binarized_data")

# Which special tokens wrap a line, per tokenizer family: [CLS] ... [SEP], <s> ... </s>,
# <|endoftext|> ... <|endoftext|>.
MARKER_ROLES = {
    "bert": ("cls_token", "sep_token"),
    "roberta": ("bos_token", "eos_token"),
    "gpt2": ("bos_token", "eos_token"),
}

# Python decodes undecodable bytes to these lone surrogates under errors="surrogateescape";
# valid UTF-8 never produces them.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Tokenize a text file (one sequence per line) into a pickled list of token id arrays.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--file_path", default="data/dump.txt", help="UTF-8 text, one sequence per line.")
    parser.add_argument(
        "--tokenizer_type", default="bert", choices=sorted(MARKER_ROLES),
        help="Tokenizer family, which picks the markers: [CLS] ... [SEP] (bert), <s> ... </s> (roberta), "
        "<|endoftext|> ... <|endoftext|> (gpt2).",
    )
    parser.add_argument(
        "--tokenizer_name", default="bert-base-uncased", help="Hub name or local tokenizer directory."
    )
    parser.add_argument(
        "--dump_file", default="data/dump", help="Output prefix: writes {dump_file}.{tokenizer name}.pickle."
    )
    parser.add_argument(
        "--seed", type=int, default=None,
        help="Seed of the shuffle; without it a fresh seed is drawn and logged so the run can be repeated.",
    )
    parser.add_argument(
        "--workers", type=int, default=1,
        help="Worker processes encoding in parallel (1: encode in this process, the Rust tokenizer still "
        "uses every core).",
    )
    parser.add_argument("--batch_size", type=int, default=10_000, help="Lines per batched tokenizer call.")
    return parser


def output_path(dump_file: str, tokenizer_name: str) -> Path:
    """`{dump_file}.{name}.pickle`, where name is the last component of a path or hub name.

    The original used the whole name, so `--tokenizer_name /models/bert` gave a path into a
    folder that does not exist.
    """
    local = Path(tokenizer_name)
    name = local.resolve().name if local.exists() else tokenizer_name.rstrip("/").rsplit("/", 1)[-1]
    return Path(f"{dump_file}.{name}.pickle")


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
    target = output_path(args.dump_file, args.tokenizer_name)
    if not target.parent.is_dir():
        raise ScriptError(f"--dump_file {args.dump_file!r}: folder {str(target.parent)!r} does not exist")
    if args.workers < 1:
        raise ScriptError(f"--workers must be at least 1 (got {args.workers})")
    if args.batch_size < 1:
        raise ScriptError(f"--batch_size must be at least 1 (got {args.batch_size})")


def has_text(path: Path) -> bool:
    """Whether the file has a non-blank line; reads only up to the first one."""
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        return any(line.strip() for line in handle)


class LineEncoder:
    """Turns a batch of stripped lines into token ids, in this process or in a worker (it pickles).

    Args:
        backend: the Rust `tokenizers.Tokenizer` behind the fast transformers tokenizer.
        start: literal start marker, e.g. "[CLS]".
        end: literal end marker, e.g. "[SEP]".
        dtype: dtype of the ids, see `ids_dtype`.
    """

    def __init__(self, backend: Tokenizer, start: str, end: str, dtype: np.dtype):
        self.backend = backend
        self.start = start
        self.end = end
        self.dtype = dtype

    def __call__(self, lines: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode `f"{start} {line} {end}"` for every line without letting the tokenizer add markers.

        Returns:
            ids: (n_tokens,) ids of all lines, one after the other.
            lengths: (len(lines),) number of ids of each line.
        """
        texts = [f"{self.start} {line} {self.end}" for line in lines]
        # encode_batch_fast skips the character offsets we do not need; one call per batch lets
        # the Rust side spread the lines over every core.
        id_lists = [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
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
        # Text mode, as the original: \n, \r\n and \r all end a line.
        with open(self.path, encoding="utf-8", errors="surrogateescape") as handle:
            while raw := list(islice(handle, self.chunk_size)):
                self._check_decodable(raw)
                self.n_lines += len(raw)
                self.bytes_read = handle.buffer.tell()
                lines = [line for line in map(str.strip, raw) if line]
                self.n_blank += len(raw) - len(lines)
                if lines:
                    yield lines

    def _check_decodable(self, raw: list[str]) -> None:
        """Raise a ScriptError naming the first line of `raw` that was not valid UTF-8."""
        if _UNDECODABLE.search("".join(raw)) is None:
            return
        bad = next(i for i, line in enumerate(raw) if _UNDECODABLE.search(line))
        raise ScriptError(f"{str(self.path)!r} line {self.n_lines + bad + 1} is not valid UTF-8")


def load_tokenizer(name: str) -> "PreTrainedTokenizerBase":
    """AutoTokenizer for a hub name or a local directory; any failure becomes a one-line ScriptError."""
    # Imported here: worker processes re-import this module and only need the Rust tokenizer.
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    # transformers reports "not a tokenizer" as OSError, ValueError, KeyError... depending on what is missing.
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ScriptError(f"--tokenizer_name {name!r} could not be loaded as a tokenizer: {first_line}") from err
    if not getattr(tokenizer, "is_fast", False):
        raise ScriptError(f"--tokenizer_name {name!r} has no fast (Rust) tokenizer, which batched encoding needs")
    return tokenizer


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


def bounded_map(executor: Executor, fn: Callable, items: Iterable, depth: int) -> Iterator:
    """`executor.map` that keeps at most `depth` items in flight, so a huge input is never all in memory."""
    pending: deque[Future] = deque()
    for item in items:
        if len(pending) == depth:
            yield pending.popleft().result()
        pending.append(executor.submit(fn, item))
    while pending:
        yield pending.popleft().result()


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


def encode_corpus(chunks: LineChunks, encoder: LineEncoder, workers: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Encode every chunk, in order, with a progress bar over the bytes of the input.

    Returns:
        ids: per chunk, the (n_tokens,) ids of its lines one after the other.
        lengths: per chunk, the (n_lines,) number of ids of each line.
    """
    all_ids, all_lengths = [], []
    executor, fn, parallel = make_executor(encoder, workers)
    with executor, tqdm(total=chunks.path.stat().st_size, unit="B", unit_scale=True, desc="binarizing") as bar:
        # Two batches per worker in flight: none waits for work, and memory stays a few batches.
        for ids, lengths in bounded_map(executor, fn, chunks, depth=2 * parallel):
            all_ids.append(ids)
            all_lengths.append(lengths)
            bar.update(chunks.bytes_read - bar.n)
    return all_ids, all_lengths


def shuffled_sequences(ids: list[np.ndarray], lengths: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """One array per line, in an order fixed by `seed`.

    The arrays are views into the per-chunk buffers: no copy, and pickling a view writes only its
    own ids.
    """
    sequences = []
    for chunk_ids, chunk_lengths in zip(ids, lengths):
        ends = np.cumsum(chunk_lengths).tolist()
        sequences += [chunk_ids[begin:end] for begin, end in zip([0, *ends[:-1]], ends)]
    order = np.random.default_rng(seed).permutation(len(sequences))
    return [sequences[i] for i in order.tolist()]


class ArrayListPickler(pickle.Pickler):
    """Pickles 1-D arrays exactly as numpy's own protocol-4 pickles do, in half the time.

    numpy's `__reduce_ex__` spends about 3 µs per array, most of the writing time for millions of
    short lines. The same reduction built here shares its constant part, which the pickle then
    stores once. Any reader of numpy pickles (the original scripts, `token_data`) loads the file.
    """

    _EMPTY_ARRAY = (np.ndarray, (0,), b"b")  # what numpy's reduction starts from

    def reducer_override(self, obj: object) -> object:
        if type(obj) is np.ndarray and obj.ndim == 1:
            return np_multiarray._reconstruct, self._EMPTY_ARRAY, (1, obj.shape, obj.dtype, False, obj.tobytes())
        return NotImplemented


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logger.info("Arguments: %s", vars(args))
    check_paths(args)
    tokenizer = load_tokenizer(args.tokenizer_name)
    start, end = marker_tokens(tokenizer, args.tokenizer_type)
    dtype = ids_dtype(len(tokenizer))
    logger.info("Lines become %r ... %r; %d tokens in the vocabulary: ids are %s", start, end, len(tokenizer), dtype)
    encoder = LineEncoder(tokenizer.backend_tokenizer, start, end, dtype)

    began = time.perf_counter()
    chunks = LineChunks(args.file_path, args.batch_size)
    ids, lengths = encode_corpus(chunks, encoder, args.workers)
    n_sequences = sum(map(len, lengths))
    elapsed = time.perf_counter() - began
    logger.info(
        "%d lines read, %d blank lines skipped, %d sequences, %d tokens, in %.1fs (%.0f lines/s)",
        chunks.n_lines, chunks.n_blank, n_sequences, sum(map(len, ids)), elapsed, chunks.n_lines / elapsed,
    )

    seed = secrets.randbits(32) if args.seed is None else args.seed
    logger.info("Shuffling with seed %d%s", seed, "" if args.seed is not None else f"; --seed {seed} repeats it")
    sequences = shuffled_sequences(ids, lengths, seed)

    target = output_path(args.dump_file, args.tokenizer_name)
    with atomic_output(target) as tmp, open(tmp, "wb") as handle:
        # Protocol 4, as numpy writes it for small arrays; readable by every Python 3.
        ArrayListPickler(handle, protocol=4).dump(sequences)
    logger.info("Wrote %d sequences to %s", len(sequences), target)


if __name__ == "__main__":
    run_cli(main)
