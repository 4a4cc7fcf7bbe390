"""Count how often every token id occurs in binarized data, for rarity-smoothed MLM masking.

Output: a pickled plain list of `--vocab_size` Python ints; entry i is the number of occurrences
of id i in the whole data, start and end markers included. train.py turns it into masking
probabilities (`max(count, 1) ** -mlm_smoothing`).

Usage (the original README's command):
    python scripts/token_counts.py --data_file data/binarized_text.bert-base-uncased.pickle \\
        --token_counts_dump data/token_counts.bert-base-uncased.pickle --vocab_size 30522
Memory-mapped data (binarized_data.py --format mmap) is counted a slice at a time, never loaded whole:
    python scripts/token_counts.py --data_file data/binarized_text.bert-base-uncased.ids.npy \\
        --token_counts_dump data/token_counts.bert-base-uncased.pickle --vocab_size 30522
"""

import argparse
import logging
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from operator import attrgetter
from pathlib import Path

import numpy as np

from cli_flags import ArgumentParser, positive_int
from cli_utils import ScriptError, atomic_output, bounded_map, check_output_path, run_cli
from file_safety import check_fits_in_memory, check_outputs_apart
from token_data import is_mmap_file, load_token_id_arrays, load_token_id_mmap, mmap_files

logger = logging.getLogger("token_counts")

# Arrays are gathered a group at a time and counted in slices: no concatenated copy of the whole
# data, and np.bincount's intp copy of its input stays small (32 MB) and in cache.
_GROUP = 4096
_SLICE = 1 << 22


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Token id frequencies of binarized data (used to smooth the MLM masking probabilities).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data_file", default="data/dump.bert-base-uncased.pickle",
        help="Output of binarized_data.py: the .pickle, or the .ids.npy file of the memory-mapped format.",
    )
    parser.add_argument(
        "--token_counts_dump", default="data/token_counts.bert-base-uncased.pickle", help="Where to write the counts."
    )
    parser.add_argument(
        "--vocab_size", default=30522, type=positive_int,
        help="Length of the counts list: the tokenizer's vocabulary size."
    )
    return parser


# Memory per vocabulary entry while counting: the int64 bincount, the list's pointer and its int object.
BYTES_PER_COUNT = 8 + 8 + 32


def count_tokens(sequences: Sequence[np.ndarray], vocab_size: int) -> list[int]:
    """Occurrences of every id in `sequences`, counted with np.bincount (no Python loop over ids).

    Args:
        sequences: 1-D integer arrays of token ids (uint16 or int32).
        vocab_size: length of the result; every id must be below it.

    Returns:
        counts: `vocab_size` Python ints, counts[i] = occurrences of id i.

    Raises:
        ScriptError: an id is negative or not below `vocab_size`.
    """
    groups = (sequences[start : start + _GROUP] for start in range(0, len(sequences), _GROUP))
    return _count_chunks((partial(_gather, group) for group in groups), vocab_size, partial(_largest_in_arrays, sequences))


def count_token_ids(ids: np.ndarray, vocab_size: int) -> list[int]:
    """Occurrences of every id in one flat id array, which may be memory-mapped, a slice at a time.

    Memory stays a few slices whatever the size of `ids`: a mapped corpus is read once, never loaded.

    Args:
        ids: (n_tokens,) integer token ids (uint16 or int32).
        vocab_size: length of the result; every id must be below it.

    Returns:
        counts: `vocab_size` Python ints, counts[i] = occurrences of id i.

    Raises:
        ScriptError: an id is negative or not below `vocab_size`.
    """
    slices = (partial(ids.__getitem__, slice(begin, begin + _SLICE)) for begin in range(0, ids.size, _SLICE))
    return _count_chunks(slices, vocab_size, partial(_largest_in_flat, ids))


def _zero_counts(vocab_size: int) -> np.ndarray:
    """(vocab_size,) int64 zeros, or a ScriptError for a --vocab_size below 1."""
    if vocab_size < 1:
        raise ScriptError(f"--vocab_size must be positive (got {vocab_size})")
    return np.zeros(vocab_size, dtype=np.int64)


def _count_chunks(chunks: Iterable[Callable[[], np.ndarray]], vocab_size: int, largest: Callable[[], int]) -> list[int]:
    """Sum the counts of every chunk of ids (each read by calling it), on one thread per core.

    np.bincount releases the GIL while it converts and counts, so one thread's counting overlaps
    another's gathering. `largest()` names the largest id of all on error.
    """
    counts = _zero_counts(vocab_size)

    def count(chunk: Callable[[], np.ndarray]) -> np.ndarray:
        ids = chunk()
        _check_ids(ids, vocab_size, largest)
        slices = (ids[begin : begin + _SLICE] for begin in range(0, ids.size, _SLICE))
        return sum((np.bincount(part, minlength=vocab_size) for part in slices), start=np.zeros(vocab_size, np.int64))

    n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(n_threads) as pool:
        for chunk_counts in bounded_map(pool, count, chunks, depth=8 * n_threads):
            counts += chunk_counts
    return counts.tolist()


def _largest_in_arrays(sequences: Sequence[np.ndarray]) -> int:
    """The largest id of all `sequences` (computed only to word an error)."""
    return max(int(seq.max()) for seq in sequences if seq.size)


def _largest_in_flat(ids: np.ndarray) -> int:
    """The largest id of (n,) `ids`, a slice at a time (computed only to word an error)."""
    return max(int(ids[begin : begin + _SLICE].max()) for begin in range(0, ids.size, _SLICE))


def _gather(group: Sequence[np.ndarray]) -> np.ndarray:
    """The ids of `group`, one array after the other.

    When every array has the same dtype, bytes.join copies them about twice as fast as
    np.concatenate, which is most of the time spent on many short arrays.
    """
    dtypes = set(map(attrgetter("dtype"), group))
    if len(dtypes) == 1:
        try:
            return np.frombuffer(b"".join(group), dtype=dtypes.pop())
        except TypeError:  # a non-contiguous array has no flat buffer: numpy copies it below
            pass
    return np.concatenate(group)


def _check_ids(ids: np.ndarray, vocab_size: int, largest: Callable[[], int]) -> None:
    """Raise a ScriptError if `ids` holds one outside [0, vocab_size); `largest()` gives the largest id of all."""
    if ids.dtype.kind not in "iu":
        raise ScriptError(f"token ids of mixed dtypes combine to {ids.dtype}; expected uint16 or int32 arrays")
    if ids.size == 0:
        return
    if ids.max() >= vocab_size:
        largest_id = largest()
        raise ScriptError(
            f"the data holds token id {largest_id} (the largest id seen) but --vocab_size is {vocab_size}; "
            f"pass the tokenizer's full vocabulary size (at least {largest_id + 1})"
        )
    if ids.dtype.kind == "i" and ids.min() < 0:
        raise ScriptError(f"the data holds a negative token id ({int(ids.min())}); it is not binarized text")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    target = Path(args.token_counts_dump)
    inputs = mmap_files(args.data_file).values() if is_mmap_file(args.data_file) else [args.data_file]
    check_outputs_apart({"--token_counts_dump": target}, [("--data_file", path) for path in inputs])
    check_output_path("--token_counts_dump", target)
    check_fits_in_memory(
        args.vocab_size * BYTES_PER_COUNT, f"--vocab_size {args.vocab_size}",
        "pass the tokenizer's vocabulary size (len(tokenizer))",
    )
    logger.info("Loading binarized data from %s", args.data_file)
    if is_mmap_file(args.data_file):
        ids = load_token_id_mmap(args.data_file).ids
        logger.info("Counting occurrences of %d token ids in %d memory-mapped ids", args.vocab_size, ids.size)
        counts = count_token_ids(ids, args.vocab_size)
    else:
        sequences = load_token_id_arrays(args.data_file)
        logger.info("Counting occurrences of %d token ids in %d sequences", args.vocab_size, len(sequences))
        counts = count_tokens(sequences, args.vocab_size)
    with atomic_output(target) as tmp, open(tmp, "wb") as handle:
        pickle.dump(counts, handle, protocol=pickle.HIGHEST_PROTOCOL)
    logger.info("Counted %d tokens; %d ids never occur; wrote %s", sum(counts), counts.count(0), args.token_counts_dump)


if __name__ == "__main__":
    run_cli(main)
