"""SQuAD v1.1 / v2.0 JSON files to examples, examples to model features, and the features' safe cache.

Features are windows of `max_seq_length` tokens over the context, built from a fast tokenizer's offsets:
[CLS] question [SEP] context window [SEP] (the tokenizer's own markers). As in the original, consecutive
windows start `doc_stride` context tokens apart and the question is cut to `max_query_length` tokens. A
training feature's answer span is in token positions; a window that does not hold the whole answer, and an
unanswerable (v2.0) question, point at the window's classifier token ([CLS], the first token for BERT-like
models). The cache is a `.npz` file of integer arrays (never a pickle) keyed by everything that shapes it.
"""

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from utils import UserError, atomic_write, logger

DEFAULT_FILES = {  # the original's names inside --data_dir, per (training, --version_2_with_negative)
    (True, False): "train-v1.1.json", (True, True): "train-v2.0.json",
    (False, False): "dev-v1.1.json", (False, True): "dev-v2.0.json",
}
NOT_CONTEXT = -1  # the offsets of a token outside the context (question, markers, padding)
CACHE_FORMAT = 1


@dataclass
class SquadExample:
    """One question on one context: its id, texts, gold answers (texts and character starts), unanswerable or not."""

    qas_id: str
    question: str
    context: str
    answers: list[str] = field(default_factory=list)
    answer_starts: list[int] = field(default_factory=list)
    is_impossible: bool = False


def squad_file(data_dir: str | None, file_name: str | None, training: bool, version_2: bool) -> str:
    """The input file the flags name: --data_dir/--train_file (or --predict_file), a default name inside --data_dir."""
    flag = "--train_file" if training else "--predict_file"
    if not data_dir and not file_name:
        raise UserError(f"{flag} or --data_dir is needed (the SQuAD JSON file to {'train on' if training else 'evaluate'})")
    path = os.path.join(data_dir or "", file_name or DEFAULT_FILES[training, version_2])
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path!r} does not exist (a SQuAD JSON file: --data_dir joined with {flag} or "
                        f"{DEFAULT_FILES[training, version_2]!r})")
    return path


def _field(record: dict, key: str, kind: type, where: str, path: str) -> object:
    """record[key], which must be a `kind`, else one error line naming the file and where."""
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise UserError(f"{path!r}: {where} has no {key!r} of type {kind.__name__}; expected the official SQuAD JSON "
                        "layout (data -> paragraphs -> context, qas -> id, question, answers)")
    return value


def read_squad_examples(path: str, training: bool, version_2: bool) -> list[SquadExample]:
    """Every question of a SQuAD JSON file, checked: one line for malformed JSON, a missing field, an answer that
    is not at its place in its context, or a question without an answer that is not marked unanswerable (v2.0).

    Args:
        path: the official layout: {"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers":
            [{"text", "answer_start"}], "is_impossible" (v2.0)}]}]}]}.
        training: a training file (each answerable question's first answer is its label).
        version_2: --version_2_with_negative: questions may be unanswerable.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path!r} is not valid JSON ({err}); expected a SQuAD v1.1/v2.0 file") from err
    except OSError as err:
        raise UserError(f"could not read {path!r}: {err.strerror or err}") from err
    examples = []
    for article in _field(data, "data", list, "the file", path):
        for paragraph in _field(article, "paragraphs", list, "an article", path):
            context = _field(paragraph, "context", str, "a paragraph", path)
            for qa in _field(paragraph, "qas", list, "a paragraph", path):
                qas_id = _field(qa, "id", str, "a question", path)
                question = _field(qa, "question", str, f"question {qas_id!r}", path)
                is_impossible = bool(qa.get("is_impossible", False)) and version_2
                answers = [] if is_impossible else _field(qa, "answers", list, f"question {qas_id!r}", path)
                texts, starts = [], []
                for answer in answers:
                    text = _field(answer, "text", str, f"an answer of question {qas_id!r}", path)
                    start = _field(answer, "answer_start", int, f"an answer of question {qas_id!r}", path)
                    if context[start:start + len(text)] != text:
                        raise UserError(f"{path!r}: the answer {text!r} of question {qas_id!r} is not in its context "
                                        f"at answer_start {start}; fix the file's answer_start or text")
                    texts.append(text)
                    starts.append(start)
                if not texts and not is_impossible:  # nothing to train on, nothing to score against
                    hint = "" if version_2 else " (a SQuAD v2.0 file needs --version_2_with_negative)"
                    raise UserError(f"{path!r}: question {qas_id!r} has no answer{hint}")
                examples.append(SquadExample(qas_id, question, context, texts, starts, is_impossible))
    if not examples:
        raise UserError(f"{path!r} holds no question")
    logger.info(f"Read {len(examples)} questions from {path}")
    return examples


def _cut_question(tokenizer: PreTrainedTokenizerBase, question: str, max_query_length: int) -> tuple[str, int]:
    """The question cut after its first `max_query_length` tokens (at the end of the last token kept), and its
    number of tokens (counted again after a cut: a word cut in two may split into other pieces)."""
    offsets = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= max_query_length:
        return question, len(offsets)
    question = question[:offsets[max_query_length - 1][1]]
    return question, len(tokenizer(question, add_special_tokens=False)["input_ids"])


def _token_span(offsets: Sequence[tuple[int, int]], context_ids: Sequence[int], start: int, end: int) -> tuple[int, int] | None:
    """(first, last) token of the character span [start, end) in a window, or None when it is not all inside."""
    first_token, last_token = context_ids[0], context_ids[-1]
    if not (offsets[first_token][0] <= start and offsets[last_token][1] >= end):
        return None
    token_start = next(i for i in context_ids if offsets[i][1] > start)
    token_end = next(i for i in reversed(context_ids) if offsets[i][0] < end)
    return token_start, token_end


def convert_examples_to_features(
    examples: Sequence[SquadExample],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    doc_stride: int,
    max_query_length: int,
    training: bool,
) -> dict[str, np.ndarray]:
    """The windows of every example as arrays, one row per feature.

    Returns:
        input_ids, attention_mask (and token_type_ids when the tokenizer makes them): (n_features, max_seq_length);
        example_index (n_features,): the example a feature comes from; cls_index (n_features,);
        offsets (n_features, max_seq_length, 2): each context token's characters in the context, NOT_CONTEXT
        elsewhere; for training, start_positions and end_positions (n_features,).
    """
    added = tokenizer.num_special_tokens_to_add(pair=True)
    rows: dict[str, list] = {}
    for index, example in enumerate(examples):
        question, n_question = _cut_question(tokenizer, example.question, max_query_length)
        capacity = max_seq_length - n_question - added  # context tokens per window
        if capacity < 1:
            raise UserError(f"--max_seq_length {max_seq_length} leaves no room for the context after a question of "
                            f"{n_question} tokens; raise it or lower --max_query_length")
        # The original moves each window doc_stride tokens on; a fast tokenizer's stride is the overlap.
        encoded = tokenizer(
            question, example.context, truncation="only_second", max_length=max_seq_length,
            stride=max(capacity - doc_stride, 0), return_overflowing_tokens=True, return_offsets_mapping=True,
            padding="max_length",
        )
        for window in range(len(encoded["input_ids"])):
            input_ids = encoded["input_ids"][window]
            sequence_ids = encoded.sequence_ids(window)
            offsets = [offset if sequence_ids[i] == 1 else (NOT_CONTEXT, NOT_CONTEXT)
                       for i, offset in enumerate(encoded["offset_mapping"][window])]
            cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
            row = {"input_ids": input_ids, "attention_mask": encoded["attention_mask"][window],
                   "example_index": index, "cls_index": cls_index, "offsets": offsets}
            if "token_type_ids" in encoded:
                row["token_type_ids"] = encoded["token_type_ids"][window]
            if training:
                context_ids = [i for i, sid in enumerate(sequence_ids) if sid == 1]
                span = None
                if not example.is_impossible and context_ids:
                    start = example.answer_starts[0]
                    span = _token_span(offsets, context_ids, start, start + len(example.answers[0]))
                row["start_positions"], row["end_positions"] = span or (cls_index, cls_index)
            for key, value in row.items():
                rows.setdefault(key, []).append(value)
    return {key: np.asarray(values, dtype=np.int64) for key, values in rows.items()}


def cache_path(input_file: str, training: bool, model_name_or_path: str, max_seq_length: int) -> Path:
    """The original's cache name, `cached_distillation_{train|dev}_{model}_{max_seq_length}`, beside the input, .npz."""
    model = Path(model_name_or_path.rstrip("/")).name
    return Path(input_file).parent / f"cached_distillation_{'train' if training else 'dev'}_{model}_{max_seq_length}.npz"


def _fingerprint(input_file: str, tokenizer: PreTrainedTokenizerBase, settings: dict) -> str:
    """A digest of what the features depend on: the input's size and time, the tokenizer, the settings."""
    stat = os.stat(input_file)
    # The backend's own truncation and padding settings change with every call: they are not what it tokenizes.
    backend = {key: value for key, value in json.loads(tokenizer.backend_tokenizer.to_str()).items()
               if key not in ("truncation", "padding")}
    tokenizer_state = json.dumps([tokenizer.get_vocab(), backend], sort_keys=True)
    text = json.dumps([CACHE_FORMAT, stat.st_size, stat.st_mtime_ns, settings], sort_keys=True) + tokenizer_state
    return hashlib.sha256(text.encode()).hexdigest()


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez into exactly `path` (np.savez adds .npz to a name without it)."""
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_or_build_features(
    input_file: str,
    examples: Sequence[SquadExample],
    tokenizer: PreTrainedTokenizerBase,
    args,
    training: bool,
    write_cache: bool,
) -> dict[str, np.ndarray]:
    """The features of `examples`, from the cache beside `input_file` when it matches, else built (and cached).

    A cache made from another file, tokenizer or settings is rebuilt; --overwrite_cache rebuilds it anyway. The
    cache is loaded with allow_pickle=False. A cache that cannot be written (read-only data folder) is skipped.
    """
    settings = {"max_seq_length": args.max_seq_length, "doc_stride": args.doc_stride, "training": training,
                "max_query_length": args.max_query_length, "version_2": args.version_2_with_negative}
    path = cache_path(input_file, training, args.model_name_or_path, args.max_seq_length)
    fingerprint = _fingerprint(input_file, tokenizer, settings)
    if path.is_file() and not args.overwrite_cache:
        try:
            with np.load(path, allow_pickle=False) as cached:
                if str(cached["fingerprint"]) == fingerprint:
                    logger.info(f"Loading features from cached file {path}")
                    return {key: cached[key] for key in cached.files if key != "fingerprint"}
            logger.info(f"Cached file {path} was made from other inputs or settings: rebuilding it")
        except (OSError, ValueError, KeyError) as err:
            logger.warning(f"Cached file {path} is unreadable ({err}): rebuilding it")
    logger.info(f"Creating features from {input_file}")
    features = convert_examples_to_features(examples, tokenizer, args.max_seq_length, args.doc_stride,
                                            args.max_query_length, training)
    if write_cache:
        try:
            atomic_write(path, lambda tmp: _save_npz(tmp, fingerprint=np.asarray(fingerprint), **features))
            logger.info(f"Saved features into cached file {path}")
        except UserError as err:
            logger.warning(f"features not cached: {err}")
    return features


class SquadFeatures(Dataset):
    """Training features as dicts of tensors (input_ids, attention_mask[, token_type_ids], start/end_positions)."""

    MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")

    def __init__(self, features: dict[str, np.ndarray]):
        self.arrays = {key: torch.from_numpy(features[key]) for key in self.MODEL_KEYS if key in features}

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: values[index] for key, values in self.arrays.items()}
