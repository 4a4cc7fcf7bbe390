"""The in-memory training corpus: token id sequences, cleaned once, padded into batches on demand."""

from argparse import Namespace
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from utils import UserError, logger

# Sequences this short carry too little context to be worth a training example (the original's cut-off).
MIN_LENGTH = 12
# A sequence is dropped when unknown tokens make up this share of it or more.
MAX_UNKNOWN_SHARE = 0.5
# Sequences compacted per step when dropping: keeps the temporaries to a few MB.
_KEEP_BLOCK = 1 << 16


class LmSeqsDataset(Dataset):
    """Token id sequences stored as one flat array plus offsets (XLM style).

    Sequence i is `token_ids[offsets[i]:offsets[i + 1]]`. Compared with a list of arrays this builds
    in seconds for tens of millions of sequences, each cleaning pass is a vectorised boolean mask,
    and DataLoader worker processes share a few large arrays instead of copying millions of objects.

    Cleaning, in the original's order, each count logged: sequences longer than
    `max_model_input_size` are split into chunks; then sequences of 11 tokens or fewer are dropped,
    then sequences that are 50 % or more unknown tokens (if the tokenizer has an unknown token).

    Args:
        params: reads `max_model_input_size`, `mlm` and `special_tok_ids` (role name -> id; with
            `mlm`: cls_token, sep_token, pad_token, without: bos_token, eos_token, unk_token; unk_token
            if present enables the unknown-token filter), and `is_master` (only the master logs
            statistics). Copied here, never written.
        data: one 1-D integer array per sequence (the output of scripts/binarized_data.py), each
            starting with the start marker and ending with the end marker (cls/sep with mlm, else bos/eos).

    Raises:
        UserError: the data is empty, is not 1-D integer arrays, a sequence does not start and end
            with the markers, or a special token the mode needs is missing from `special_tok_ids`.
    """

    def __init__(self, params: Namespace, data: Sequence[np.ndarray]):
        self.max_model_input_size = int(params.max_model_input_size)
        if self.max_model_input_size < 3:
            raise UserError(f"max_model_input_size must be at least 3 (got {self.max_model_input_size})")
        self.mlm = bool(params.mlm)
        self.is_master = getattr(params, "is_master", True)
        special_tok_ids = dict(params.special_tok_ids)
        start_role, end_role, pad_role = (
            ("cls_token", "sep_token", "pad_token") if self.mlm else ("bos_token", "eos_token", "unk_token")
        )
        self.start_id = _special_id(special_tok_ids, start_role)
        self.end_id = _special_id(special_tok_ids, end_role)
        # As the original: causal LMs pad with the unknown id (GPT-2 has no pad token); padding never
        # reaches the loss.
        self.pad_id = _special_id(special_tok_ids, pad_role)
        self.unk_id = special_tok_ids.get("unk_token")

        self._set_sequences(*_flatten(data))
        self._check()
        self.split_long_sequences()
        self._check()
        # Both filters judge each sequence on its own, so they can see the same sequences and share
        # one compaction of the id array; counts are logged as if they ran one after the other.
        short = self.short_sequences()
        unknown_heavy = self.unknown_heavy_sequences() & ~short
        self._log(f"Removed {np.count_nonzero(short)} sequences of {MIN_LENGTH - 1} tokens or fewer")
        share = f"{MAX_UNKNOWN_SHARE:.0%}"
        self._log(f"Removed {np.count_nonzero(unknown_heavy)} sequences with {share} or more unknown tokens")
        self._keep(~(short | unknown_heavy))
        self._check()
        self.log_statistics()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        """Sequence `index` as `(token_ids (length,), length)`; the ids are a read-only view."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sequence index {index} out of range for {n} sequences")
        index = int(index) % n
        return self.token_ids[self.offsets[index] : self.offsets[index + 1]], int(self.lengths[index])

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

    def split_long_sequences(self) -> None:
        """Cut every sequence longer than `max_model_input_size` into chunks that fit.

        Chunks hold `max_model_input_size - 2` ids of the sequence; the start marker is prepended to
        a chunk that does not begin with it and the end marker appended to one that does not end with
        it, so every chunk is a well-formed sequence. Chunks take the place of their sequence.
        """
        too_long = np.flatnonzero(self.lengths > self.max_model_input_size)
        if too_long.size == 0:
            self._log(f"No sequence longer than {self.max_model_input_size} tokens to split")
            return
        id_pieces, length_pieces = [], []
        copied = 0  # sequences before this index are already in the pieces
        for index in too_long:
            id_pieces.append(self.token_ids[self.offsets[copied] : self.offsets[index]])
            length_pieces.append(self.lengths[copied:index])
            chunks = self._chunks(self[index][0])
            id_pieces.extend(chunks)
            length_pieces.append(np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks)))
            copied = index + 1
        id_pieces.append(self.token_ids[self.offsets[copied] :])
        length_pieces.append(self.lengths[copied:])
        n_before = len(self)
        self._set_sequences(np.concatenate(id_pieces), np.concatenate(length_pieces))
        self._log(
            f"Split {too_long.size} sequences longer than {self.max_model_input_size} tokens "
            f"into {len(self) - n_before + too_long.size} chunks"
        )

    def short_sequences(self) -> np.ndarray:
        """(n_sequences,) bool: sequences of 11 tokens or fewer (markers included), to be dropped."""
        return self.lengths < MIN_LENGTH

    def unknown_heavy_sequences(self) -> np.ndarray:
        """(n_sequences,) bool: sequences that are 50 % or more unknown tokens, to be dropped.

        All False when the tokenizer has no unknown token.
        """
        if self.unk_id is None:
            return np.zeros(len(self), dtype=bool)
        return self._unknown_counts() >= MAX_UNKNOWN_SHARE * self.lengths

    def log_statistics(self) -> None:
        """Log the size of the cleaned corpus and its share of unknown tokens (master only)."""
        self._log(
            f"{len(self)} sequences, {self.token_ids.size} tokens, length min/mean/max "
            f"{self.lengths.min()}/{self.lengths.mean():.1f}/{self.lengths.max()}"
        )
        if self.unk_id is not None:
            n_unknown = int(np.count_nonzero(self.token_ids == self.unk_id))
            self._log(f"{n_unknown} unknown tokens ({100 * n_unknown / self.token_ids.size:.2f}% of the data)")

    def _set_sequences(self, token_ids: np.ndarray, lengths: np.ndarray) -> None:
        """Install a new flat id array and its lengths; offsets follow from the lengths."""
        self.token_ids = token_ids
        self.token_ids.flags.writeable = False  # items are views into it
        self.lengths = lengths
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])

    def _keep(self, keep: np.ndarray) -> None:
        """Keep only the sequences where the (n_sequences,) bool mask `keep` is True.

        The id array is compacted in place, a block of sequences at a time: no second copy of the
        corpus and no corpus-sized token mask, only block-sized temporaries. The dropped ids' space at
        the end of the buffer is not returned (short and unknown-heavy sequences hold few ids).
        """
        if keep.all():
            return
        token_ids = self.token_ids
        token_ids.flags.writeable = True  # built by this dataset, no item views handed out yet
        written = 0
        for first in range(0, len(self), _KEEP_BLOCK):
            last = min(first + _KEEP_BLOCK, len(self))
            block = token_ids[self.offsets[first] : self.offsets[last]]
            kept = block[np.repeat(keep[first:last], self.lengths[first:last])]
            token_ids[written : written + kept.size] = kept
            written += kept.size
        self._set_sequences(token_ids[:written], self.lengths[keep])

    def _unknown_counts(self) -> np.ndarray:
        """(n_sequences,) number of unknown ids in each sequence, without a per-token sequence index."""
        positions = np.flatnonzero(self.token_ids == self.unk_id)
        owners = np.searchsorted(self.offsets, positions, side="right") - 1
        return np.bincount(owners, minlength=len(self))

    def _chunks(self, sequence: np.ndarray) -> list[np.ndarray]:
        """`sequence` cut into pieces of `max_model_input_size - 2` ids, each wrapped in the markers if needed."""
        start = np.array([self.start_id], dtype=sequence.dtype)
        end = np.array([self.end_id], dtype=sequence.dtype)
        size = self.max_model_input_size - 2
        chunks = []
        for begin in range(0, len(sequence), size):
            chunk = sequence[begin : begin + size]
            if chunk[0] != self.start_id:
                chunk = np.concatenate((start, chunk))
            if chunk[-1] != self.end_id:
                chunk = np.concatenate((chunk, end))
            chunks.append(chunk)
        return chunks

    def _check(self) -> None:
        """Raise unless every sequence is non-empty and starts and ends with the markers."""
        if self.offsets[-1] != self.token_ids.size:
            raise RuntimeError(f"offsets end at {self.offsets[-1]} but there are {self.token_ids.size} ids")
        if len(self) == 0:
            raise UserError("no sequence left after cleaning: the data holds only short or unknown-heavy sequences")
        if (self.lengths <= 0).any():
            raise UserError(f"sequence {int(np.argmax(self.lengths <= 0))} is empty")
        for where, role, expected, ids in (
            ("start", "start marker", self.start_id, self.token_ids[self.offsets[:-1]]),
            ("end", "end marker", self.end_id, self.token_ids[self.offsets[1:] - 1]),
        ):
            wrong = np.flatnonzero(ids != expected)
            if wrong.size:
                raise UserError(
                    f"{wrong.size} sequences do not {where} with the {role} id {expected} (sequence {wrong[0]} "
                    f"{where}s with {ids[wrong[0]]}); was the data binarized with this teacher's tokenizer "
                    f"and --tokenizer_type, and is --mlm set as intended?"
                )

    def _log(self, message: str) -> None:
        if self.is_master:
            logger.info(message)


def _special_id(special_tok_ids: dict[str, int], role: str) -> int:
    """The id of `role` in `special_tok_ids`, or a UserError saying which role is missing."""
    if special_tok_ids.get(role) is None:
        raise UserError(f"the tokenizer has no {role}, which this mode needs (special tokens: {special_tok_ids})")
    return int(special_tok_ids[role])


def _flatten(data: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One flat id array and the (n_sequences,) lengths; `map(len)` and `concatenate` loop in C, not Python."""
    if len(data) == 0:
        raise UserError("the binarized data holds no sequence")
    lengths = np.fromiter(map(len, data), dtype=np.int64, count=len(data))
    token_ids = np.concatenate(data)
    if token_ids.ndim != 1 or token_ids.dtype.kind not in "iu":
        raise UserError(f"expected 1-D integer token id arrays, got {token_ids.ndim}-D arrays of {token_ids.dtype}")
    return token_ids, lengths
