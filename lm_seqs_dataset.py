"""The training corpus: token id sequences, cleaned once, padded into batches on demand.

The ids are never copied after loading. They stay in the one flat array they came in (built from a
pickle's list, or a memory-mapped file that every process of a node shares through the page
cache), and the cleaning passes work on small per-sequence index arrays over it: where each
sequence starts, its length, and whether a split chunk gets its start or end marker back when it
is read.
"""

import mmap
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from utils import UserError, logger

# Sequences this short carry too little context to be worth a training example (the original's cut-off).
MIN_LENGTH = 12
# A sequence is dropped when unknown tokens make up this share of it or more.
MAX_UNKNOWN_SHARE = 0.5
# Ids scanned per step when counting unknown tokens: the temporaries stay a few tens of MB however
# large the (memory-mapped) corpus.
_SCAN_BLOCK = 1 << 24


@dataclass(frozen=True)
class FlatCorpus:
    """Token id sequences as one flat array plus offsets (XLM style), and the order to serve them in.

    Sequence k is `ids[offsets[k]:offsets[k + 1]]`; the dataset serves sequence `order[0]` first,
    then `order[1]`, ... The arrays may be memory-mapped (`np.load(..., mmap_mode="r")`): the dataset
    reads `ids` where it lies and never copies it.

    Attributes:
        ids: (n_tokens,) integer token ids (uint16 or int32), the sequences one after the other.
        offsets: (n_sequences + 1,) non-decreasing integers from 0 to n_tokens.
        order: (n_sequences,) a permutation of range(n_sequences), or None to serve the stored order
            (binarized_data.py stores the sequences as read and their shuffle here).

    Raises:
        UserError: the arrays do not fit together as described.
    """

    ids: np.ndarray
    offsets: np.ndarray
    order: np.ndarray | None = None

    def __post_init__(self):
        if self.ids.ndim != 1 or self.ids.dtype.kind not in "iu":
            raise UserError(f"expected 1-D integer token ids, got a {self.ids.ndim}-D array of {self.ids.dtype}")
        offsets = self.offsets
        if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) < 2:
            raise UserError("the binarized data holds no sequence")
        if offsets[0] != 0 or offsets[-1] != self.ids.size or (np.diff(offsets) < 0).any():
            raise UserError(
                f"the offsets do not cut the {self.ids.size} ids into sequences (they run from {offsets[0]} to "
                f"{offsets[-1]}, or go backwards)"
            )
        n = len(offsets) - 1
        if self.order is not None and not _is_permutation(self.order, n):
            raise UserError(f"the order of the sequences is not a permutation of the {n} sequences")

    def first_id_outside(self, vocab_size: int) -> int | None:
        """The first id that is negative or not below `vocab_size`, or None; a block at a time (a mapped
        corpus streams from disk once, never loaded whole)."""
        if self.ids.dtype.kind == "u" and np.iinfo(self.ids.dtype).max < vocab_size:
            return None  # every value of the dtype is a valid id
        for begin in range(0, self.ids.size, _SCAN_BLOCK):
            block = self.ids[begin : begin + _SCAN_BLOCK]
            if block.size and (block.max() >= vocab_size or block.min() < 0):
                return int(block[np.argmax((block >= vocab_size) | (block < 0))])
        return None

    @classmethod
    def from_arrays(cls, data: Sequence[np.ndarray]) -> "FlatCorpus":
        """One flat copy of a list of 1-D id arrays; `map(len)` and `concatenate` loop in C, not Python."""
        if len(data) == 0:
            raise UserError("the binarized data holds no sequence")
        lengths = np.fromiter(map(len, data), dtype=np.int64, count=len(data))
        ids = np.concatenate(data)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise UserError(f"expected 1-D integer token id arrays, got {ids.ndim}-D arrays of {ids.dtype}")
        offsets = np.zeros(len(data) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(ids, offsets)


class LmSeqsDataset(Dataset):
    """Token id sequences over one flat id array, cleaned with vectorised passes over index arrays.

    Sequence i holds `token_ids[starts[i]:starts[i] + n]` with `n = lengths[i] - add_start[i] -
    add_end[i]`, preceded by the start marker if `add_start[i]` and followed by the end marker if
    `add_end[i]` (only chunks of split sequences get markers back). No pass copies `token_ids`, so
    with a memory-mapped corpus each process costs these index arrays (18 bytes per sequence) and
    shares the ids with every other process on the node.

    Cleaning, in the original's order, each count logged: sequences longer than
    `max_model_input_size` are split into chunks; then sequences of 11 tokens or fewer are dropped,
    then sequences that are 50 % or more unknown tokens (if the tokenizer has an unknown token).
    While cleaning, the sequences stay in the order they are stored, one after the other in
    `token_ids`, which lets the unknown tokens be counted in one streaming pass; the chunks are put
    in serving order last, each split sequence's chunks in its place.

    Args:
        params: reads `max_model_input_size`, `mlm` and `special_tok_ids` (role name -> id; with
            `mlm`: cls_token, sep_token, pad_token, without: bos_token, eos_token, unk_token; unk_token
            if present enables the unknown-token filter), and `is_master` (only the master logs
            statistics); [+] `markers` when set, {"start": id or None, "end": id or None, "pad": id}, replaces
            the roles' markers and padding (auto families: what their tokenizer adds, maybe nothing).
            Copied here, never written.
        data: one 1-D integer array per sequence (the pickle written by scripts/binarized_data.py),
            or a `FlatCorpus` (its memory-mapped format). Each sequence starts with the start marker
            and ends with the end marker (cls/sep with mlm, else bos/eos).

    Raises:
        UserError: the data is empty, is not 1-D integer arrays, a sequence does not start and end
            with the markers, or a special token the mode needs is missing from `special_tok_ids`.
    """

    def __init__(self, params: Namespace, data: Sequence[np.ndarray] | FlatCorpus):
        self.max_model_input_size = int(params.max_model_input_size)
        if self.max_model_input_size < 3:
            raise UserError(f"max_model_input_size must be at least 3 (got {self.max_model_input_size})")
        self.mlm = bool(params.mlm)
        self.is_master = getattr(params, "is_master", True)
        special_tok_ids = dict(params.special_tok_ids)
        markers = getattr(params, "markers", None)
        if markers is None:
            start_role, end_role, pad_role = (
                ("cls_token", "sep_token", "pad_token") if self.mlm else ("bos_token", "eos_token", "unk_token")
            )
            self.start_id = _special_id(special_tok_ids, start_role)
            self.end_id = _special_id(special_tok_ids, end_role)
            # As the original: causal LMs pad with the unknown id (GPT-2 has no pad token); padding never
            # reaches the loss.
            self.pad_id = _special_id(special_tok_ids, pad_role)
        else:  # [+] auto families: what their tokenizer adds, possibly nothing
            self.start_id, self.end_id, self.pad_id = markers["start"], markers["end"], markers["pad"]
        self.unk_id = special_tok_ids.get("unk_token")

        corpus = data if isinstance(data, FlatCorpus) else FlatCorpus.from_arrays(data)
        self._set_corpus(corpus)
        self._check()
        first_chunk = self.split_long_sequences()
        self._check()
        # Both filters judge each sequence on its own, so they see the same sequences; counts are
        # logged as if they ran one after the other.
        unknown = self.unknown_counts()
        short = self.short_sequences()
        unknown_heavy = self.unknown_heavy_sequences(unknown) & ~short
        self._log(f"Removed {np.count_nonzero(short)} sequences of {MIN_LENGTH - 1} tokens or fewer")
        share = f"{MAX_UNKNOWN_SHARE:.0%}"
        self._log(f"Removed {np.count_nonzero(unknown_heavy)} sequences with {share} or more unknown tokens")
        keep = ~(short | unknown_heavy)
        self._serve(corpus.order, first_chunk, keep)
        self._check()
        self.log_statistics(int(unknown[keep].sum()))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getstate__(self) -> dict:
        """Pickle a memory-mapped corpus as where its ids lie, not as the ids themselves.

        A DataLoader worker started by spawn or forkserver receives the dataset pickled: it maps the
        same file again (and shares the page cache) instead of getting a copy of the corpus.
        """
        state = self.__dict__.copy()
        mapped = self.token_ids.base
        # Only a whole map made by np.memmap/np.load knows its own offset; a slice of one does not.
        whole_map = isinstance(mapped, np.memmap) and isinstance(mapped.base, mmap.mmap)
        if whole_map and mapped.shape == self.token_ids.shape:
            state["token_ids"] = _MappedIds(mapped.filename, mapped.dtype, mapped.offset, mapped.shape)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["token_ids"], _MappedIds):
            state["token_ids"] = state["token_ids"].open()
        self.__dict__.update(state)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        """Sequence `index` as `(token_ids (length,), length)`.

        The ids are a read-only view of the corpus (of the map, for a memory-mapped one), or a small
        new array for a chunk that gets a marker back.
        """
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sequence index {index} out of range for {n} sequences")
        index = int(index) % n
        add_start, add_end = int(self.add_start[index]), int(self.add_end[index])
        length = int(self.lengths[index])
        start = int(self.starts[index])
        ids = self.token_ids[start : start + length - add_start - add_end]
        if add_start or add_end:
            ids = np.concatenate((self._start_marker[:add_start], ids, self._end_marker[:add_end]))
        return ids, length

    def batch_sequences(self, batch: Sequence[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Collate `(token_ids, length)` items, padding to the longest with the pad id (MLM) or the unknown id (CLM).

        Args:
            batch: items from `__getitem__`.

        Returns:
            token_ids: (bs, max_len) int64, each row a sequence then padding.
            lengths: (bs,) int64, the number of real tokens of each row.
        """
        sequences = [ids for ids, _ in batch]
        lengths = torch.tensor([length for _, length in batch], dtype=torch.long)
        actual = torch.tensor([len(ids) for ids in sequences], dtype=torch.long)
        if not torch.equal(actual, lengths):
            raise ValueError(f"batch lengths {lengths.tolist()} do not match the sequences' sizes {actual.tolist()}")
        width = int(lengths.max())
        token_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        real = torch.arange(width) < lengths[:, None]  # (bs, max_len), row-major like the concatenation
        token_ids[real] = torch.from_numpy(np.concatenate(sequences).astype(np.int64))
        return token_ids, lengths

    def split_long_sequences(self) -> np.ndarray:
        """Cut every sequence longer than `max_model_input_size` into chunks that fit.

        Chunks hold `max_model_input_size - 2` ids of the sequence; the start marker is prepended to
        a chunk that does not begin with it and the end marker appended to one that does not end with
        it, so every chunk is a well-formed sequence. Chunks take the place of their sequence. Only
        index ranges are made: the markers are added when a chunk is read.

        Returns:
            first_chunk: (n_sequences + 1,) int64, sequence k became chunks first_chunk[k] to
                first_chunk[k + 1] - 1.
        """
        size = self.max_model_input_size - 2
        too_long = self.lengths > self.max_model_input_size
        n_chunks = np.where(too_long, -(-self.lengths // size), 1)  # ceil(length / size) for the long ones
        first_chunk = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(n_chunks, out=first_chunk[1:])
        n_long = np.count_nonzero(too_long)
        if n_long == 0:
            self._log(f"No sequence longer than {self.max_model_input_size} tokens to split")
            return first_chunk
        source = np.repeat(np.arange(len(self)), n_chunks)  # (n_chunks,) the sequence each chunk comes from
        skipped = (np.arange(first_chunk[-1]) - first_chunk[source]) * size  # ids of the sequence before the chunk
        split = too_long[source]
        stored = np.where(split, np.minimum(self.lengths[source] - skipped, size), self.lengths[source])
        starts = self.starts[source] + skipped
        chunks = np.flatnonzero(split)
        add_start = np.zeros(len(starts), dtype=bool)
        add_end = np.zeros(len(starts), dtype=bool)
        if self.start_id is not None:  # a tokenizer that adds no marker: chunks get none either
            add_start[chunks] = self.token_ids[starts[chunks]] != self.start_id
        if self.end_id is not None:
            add_end[chunks] = self.token_ids[starts[chunks] + stored[chunks] - 1] != self.end_id
        self._set_chunks(starts, stored + add_start + add_end, add_start, add_end)
        self._log(
            f"Split {n_long} sequences longer than {self.max_model_input_size} tokens "
            f"into {int(n_chunks[too_long].sum())} chunks"
        )
        return first_chunk

    def unknown_counts(self) -> np.ndarray:
        """(n_sequences,) int64 number of unknown ids in each sequence, re-added markers included.

        All zero when the tokenizer has no unknown token. Streams over `token_ids` a block at a time
        (a memory-mapped corpus is never loaded whole); needs the sequences in stored order, where
        their starts increase, so that each unknown id finds its sequence by binary search.
        """
        counts = np.zeros(len(self), dtype=np.int64)
        if self.unk_id is None:
            return counts
        for begin in range(0, self.token_ids.size, _SCAN_BLOCK):
            positions = begin + np.flatnonzero(self.token_ids[begin : begin + _SCAN_BLOCK] == self.unk_id)
            if positions.size:
                owners = np.searchsorted(self.starts, positions, side="right") - 1  # increasing
                counts[owners[0] : owners[-1] + 1] += np.bincount(owners - owners[0])
        # With GPT-2 the unknown id is also the marker: a re-added marker counts, as in the original.
        if self.start_id == self.unk_id:
            counts += self.add_start
        if self.end_id == self.unk_id:
            counts += self.add_end
        return counts

    def short_sequences(self) -> np.ndarray:
        """(n_sequences,) bool: sequences of 11 tokens or fewer (markers included), to be dropped."""
        return self.lengths < MIN_LENGTH

    def unknown_heavy_sequences(self, unknown: np.ndarray) -> np.ndarray:
        """(n_sequences,) bool: sequences that are 50 % or more unknown tokens, to be dropped.

        Args:
            unknown: (n_sequences,) unknown ids per sequence, from `unknown_counts`.

        All False when the tokenizer has no unknown token.
        """
        if self.unk_id is None:
            return np.zeros(len(self), dtype=bool)
        return unknown >= MAX_UNKNOWN_SHARE * self.lengths

    def log_statistics(self, n_unknown: int) -> None:
        """Log the size of the cleaned corpus and its share of the `n_unknown` unknown tokens (master only)."""
        n_tokens = int(self.lengths.sum())
        self._log(
            f"{len(self)} sequences, {n_tokens} tokens, length min/mean/max "
            f"{self.lengths.min()}/{self.lengths.mean():.1f}/{self.lengths.max()}"
        )
        if self.unk_id is not None:
            self._log(f"{n_unknown} unknown tokens ({100 * n_unknown / n_tokens:.2f}% of the data)")

    def _set_corpus(self, corpus: FlatCorpus) -> None:
        """Take the corpus' ids without copying them, and one whole-sequence chunk per stored sequence."""
        # A plain read-only view: same memory (the map itself when mapped), and slicing it is 4x
        # faster than slicing an np.memmap.
        self.token_ids = corpus.ids.view(np.ndarray)
        self.token_ids.flags.writeable = False  # items are views into it
        self._start_marker = np.array([] if self.start_id is None else [self.start_id], dtype=self.token_ids.dtype)
        self._end_marker = np.array([] if self.end_id is None else [self.end_id], dtype=self.token_ids.dtype)
        no_marker = np.zeros(len(corpus.offsets) - 1, dtype=bool)
        self._set_chunks(
            np.asarray(corpus.offsets[:-1], dtype=np.int64), np.diff(corpus.offsets).astype(np.int64), no_marker,
            no_marker,
        )

    def _set_chunks(self, starts: np.ndarray, lengths: np.ndarray, add_start: np.ndarray, add_end: np.ndarray) -> None:
        """Install the per-sequence index arrays, each (n_sequences,): see the class docstring."""
        self.starts = starts
        self.lengths = lengths
        self.add_start = add_start
        self.add_end = add_end

    def _serve(self, order: np.ndarray | None, first_chunk: np.ndarray, keep: np.ndarray) -> None:
        """Put the chunks in serving order and keep those where the (n_chunks,) bool mask `keep` is True.

        Serving order: the stored sequences in `order` (None: as stored), each split one's chunks in
        its place, in order. `first_chunk` is what `split_long_sequences` returned.
        """
        n_chunks = np.diff(first_chunk)
        first = first_chunk[:-1]
        if order is not None:
            first, n_chunks = first[order], n_chunks[order]
        served = _concatenated_ranges(first, n_chunks)
        served = served[keep[served]]
        self._set_chunks(self.starts[served], self.lengths[served], self.add_start[served], self.add_end[served])

    def _check(self) -> None:
        """Raise unless every sequence is non-empty and starts and ends with the markers (those it has)."""
        if len(self) == 0:
            raise UserError("no sequence left after cleaning: the data holds only short or unknown-heavy sequences")
        if (self.lengths <= 0).any():
            raise UserError(f"sequence {int(np.argmax(self.lengths <= 0))} is empty")
        ends = self.starts + self.lengths - self.add_start - self.add_end
        for where, role, expected, added, ids in (
            ("start", "start marker", self.start_id, self.add_start, self.token_ids[self.starts]),
            ("end", "end marker", self.end_id, self.add_end, self.token_ids[ends - 1]),
        ):
            if expected is None:
                continue
            wrong = np.flatnonzero((ids != expected) & ~added)
            if wrong.size:
                raise UserError(
                    f"{wrong.size} sequences do not {where} with the {role} id {expected} (sequence {wrong[0]} "
                    f"{where}s with {ids[wrong[0]]}); was the data binarized with this teacher's tokenizer "
                    f"and --tokenizer_type, and is --mlm set as intended?"
                )

    def _log(self, message: str) -> None:
        if self.is_master:
            logger.info(message)


@dataclass(frozen=True)
class _MappedIds:
    """Where a memory-mapped id array lies in its file: what a pickled dataset carries instead of the ids."""

    filename: str
    dtype: np.dtype
    offset: int
    shape: tuple[int, ...]

    def open(self) -> np.ndarray:
        """The ids mapped again, read-only, as the plain view `_set_corpus` keeps."""
        ids = np.memmap(self.filename, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        return ids.view(np.ndarray)


def _special_id(special_tok_ids: dict[str, int], role: str) -> int:
    """The id of `role` in `special_tok_ids`, or a UserError saying which role is missing."""
    if special_tok_ids.get(role) is None:
        raise UserError(f"the tokenizer has no {role}, which this mode needs (special tokens: {special_tok_ids})")
    return int(special_tok_ids[role])


def _is_permutation(order: np.ndarray, n: int) -> bool:
    """Whether `order` holds every integer of range(n) exactly once."""
    if order.ndim != 1 or order.dtype.kind not in "iu" or len(order) != n:
        return False
    return n == 0 or (order.min() >= 0 and order.max() < n and (np.bincount(order, minlength=n) == 1).all())


def _concatenated_ranges(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`np.concatenate([np.arange(f, f + c) for f, c in zip(first, counts)])` without a Python loop."""
    ends = np.cumsum(counts)
    return np.arange(ends[-1]) + np.repeat(first - (ends - counts), counts)
