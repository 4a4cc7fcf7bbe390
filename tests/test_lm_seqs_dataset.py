"""LmSeqsDataset: cleaning passes on hand-made sequences, equality with a slow loop reference,
padding, and the way the distributed trainer consumes it."""

import logging
import math
import pickle
from argparse import Namespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import lm_seqs_dataset
from grouped_batch_sampler import GroupedBatchSampler, create_lengths_groups
from lm_seqs_dataset import FlatCorpus, LmSeqsDataset
from utils import UserError

# BERT-like ids for MLM; GPT-2-like for CLM, where one id is bos, eos and unk at once.
PAD, UNK, CLS, SEP = 0, 1, 2, 3
MLM_IDS = {"pad_token": PAD, "unk_token": UNK, "cls_token": CLS, "sep_token": SEP, "mask_token": 4}
EOT = 50
CLM_IDS = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}


def params(max_size: int = 16, mlm: bool = True, special_tok_ids: dict | None = None) -> Namespace:
    ids = special_tok_ids if special_tok_ids is not None else (MLM_IDS if mlm else CLM_IDS)
    return Namespace(max_model_input_size=max_size, mlm=mlm, special_tok_ids=ids, is_master=True)


def seq(*ids: int) -> np.ndarray:
    return np.array(ids, dtype=np.uint16)


def words(first: int, n: int) -> list[int]:
    """n ordinary token ids first, first + 1, ..."""
    return list(range(first, first + n))


def items(dataset: LmSeqsDataset) -> list[list[int]]:
    return [dataset[i][0].tolist() for i in range(len(dataset))]


def test_cleaning_by_hand(caplog):
    data = [
        seq(CLS, *words(100, 38), SEP),  # 40 tokens: chunks of 14 -> 15, 16 and 13 tokens
        seq(CLS, *words(200, 14), SEP),  # 16 tokens: exactly the maximum, kept whole
        seq(CLS, *words(300, 15), SEP),  # 17 tokens: 15-token chunk + [CLS w w SEP], which is then too short
        seq(CLS, *words(400, 26), SEP),  # 28 tokens: the second chunk already ends with [SEP]
        seq(CLS, *words(500, 9), SEP),  # 11 tokens: too short
        seq(CLS, *words(600, 10), SEP),  # 12 tokens: kept
        seq(CLS, UNK, UNK, UNK, UNK, UNK, UNK, *words(700, 4), SEP),  # 6 of 12 unknown: dropped
        seq(CLS, UNK, UNK, UNK, UNK, UNK, *words(800, 5), SEP),  # 5 of 12 unknown: kept
    ]
    with caplog.at_level(logging.INFO):
        dataset = LmSeqsDataset(params(max_size=16), data)
    assert items(dataset) == [
        [CLS, *words(100, 13), SEP],
        [CLS, *words(113, 14), SEP],
        [CLS, *words(127, 11), SEP],
        [CLS, *words(200, 14), SEP],
        [CLS, *words(300, 13), SEP],
        [CLS, *words(400, 13), SEP],
        [CLS, *words(413, 13), SEP],
        [CLS, *words(600, 10), SEP],
        [CLS, UNK, UNK, UNK, UNK, UNK, *words(800, 5), SEP],
    ]
    assert dataset.lengths.tolist() == [15, 16, 13, 16, 15, 15, 15, 12, 12]
    assert "Split 3 sequences longer than 16 tokens into 7 chunks" in caplog.text
    assert "Removed 2 sequences of 11 tokens or fewer" in caplog.text
    assert "Removed 1 sequences with 50% or more unknown tokens" in caplog.text


def test_no_unknown_filter_without_an_unknown_token():
    ids = {role: i for role, i in MLM_IDS.items() if role != "unk_token"}
    unknown_heavy = seq(CLS, UNK, UNK, UNK, UNK, UNK, UNK, *words(700, 4), SEP)
    dataset = LmSeqsDataset(params(special_tok_ids=ids), [unknown_heavy])
    assert items(dataset) == [unknown_heavy.tolist()]


def test_clm_markers_and_unknown_share_count_the_shared_id():
    data = [
        seq(EOT, *words(100, 10), EOT),  # 2 of 12 are the unknown id: kept
        seq(EOT, EOT, EOT, EOT, EOT, *words(200, 6), EOT),  # 6 of 12: dropped
        seq(EOT, *words(300, 24), EOT),  # 26 tokens, max 16: chunks of 14 ids, markers re-added
    ]
    dataset = LmSeqsDataset(params(max_size=16, mlm=False), data)
    assert items(dataset) == [
        [EOT, *words(100, 10), EOT],
        [EOT, *words(300, 13), EOT],
        [EOT, *words(313, 11), EOT],
    ]


def slow_reference(data: list[np.ndarray], max_size: int, start: int, end: int, unk: int | None) -> list[list[int]]:
    """SPEC §4 as a plain loop: split, then drop <= 11 tokens, then drop >= 50 % unknown."""
    split = []
    for ids in map(list, data):
        if len(ids) <= max_size:
            split.append(ids)
            continue
        for begin in range(0, len(ids), max_size - 2):
            chunk = ids[begin : begin + max_size - 2]
            if chunk[0] != start:
                chunk = [start, *chunk]
            if chunk[-1] != end:
                chunk = [*chunk, end]
            split.append(chunk)
    long_enough = [ids for ids in split if len(ids) > 11]
    if unk is None:
        return long_enough
    return [ids for ids in long_enough if sum(i == unk for i in ids) / len(ids) < 0.5]


def random_corpus(seed: int, n: int, start: int, end: int, unk: int) -> list[np.ndarray]:
    """Sequences of 2 to 120 tokens with a random share of unknown ids, some of them marker ids too."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(n):
        body = rng.integers(5, 60, size=rng.integers(0, 119))
        body[rng.random(body.size) < rng.choice([0.0, 0.3, 0.7])] = unk
        body[rng.random(body.size) < 0.05] = rng.choice([start, end])
        data.append(np.array([start, *body, end], dtype=np.uint16))
    return data


@pytest.mark.parametrize("max_size", [13, 32, 512])
@pytest.mark.parametrize("mlm", [True, False])
def test_equals_the_slow_reference(monkeypatch, max_size, mlm):
    monkeypatch.setattr(lm_seqs_dataset, "_SCAN_BLOCK", 7)  # the unknown-token scan over many blocks
    ids = MLM_IDS if mlm else CLM_IDS
    start, end = (CLS, SEP) if mlm else (EOT, EOT)
    data = random_corpus(max_size, 2000, start, end, ids["unk_token"])
    dataset = LmSeqsDataset(params(max_size=max_size, mlm=mlm), data)
    expected = slow_reference(data, max_size, start, end, ids["unk_token"])
    assert items(dataset) == expected
    assert dataset.lengths.tolist() == [len(ids) for ids in expected]
    assert max(dataset.lengths) <= max_size


def test_split_keeps_every_id_once():
    # Lengths whose last chunk keeps >= 12 tokens, so the short-sequence pass removes no chunk.
    rng = np.random.default_rng(0)
    sizes = 22 * rng.integers(1, 20, 50) + rng.integers(11, 22, 50) - 2
    data = [np.array([CLS, *rng.integers(5, 99, size=n), SEP], dtype=np.uint16) for n in sizes]
    dataset = LmSeqsDataset(params(max_size=24, special_tok_ids={**MLM_IDS, "unk_token": None}), data)
    chunks = items(dataset)
    assert all(len(c) <= 24 and c[0] == CLS and c[-1] == SEP for c in chunks)
    # Without the markers (re-added or original), the chunks are the sequences' ids, in order.
    body = [i for c in chunks for i in c if i not in (CLS, SEP)]
    assert body == [int(i) for ids in data for i in ids[1:-1]]


@pytest.mark.parametrize(
    "data, message",
    [
        ([seq(CLS, *words(10, 12), SEP), seq(7, *words(10, 12), SEP)], "sequence 1 starts with 7"),
        ([seq(CLS, *words(10, 12), 9)], "sequence 0 ends with 9"),
        ([seq()], "sequence 0 is empty"),
        ([], "holds no sequence"),
        ([seq(CLS, *words(10, 3), SEP)], "no sequence left"),
    ],
)
def test_malformed_data_raises_a_user_error(data, message):
    with pytest.raises(UserError, match=message):
        LmSeqsDataset(params(), data)


def test_missing_special_token_raises_a_user_error():
    with pytest.raises(UserError, match="no pad_token"):
        LmSeqsDataset(params(special_tok_ids={"cls_token": CLS, "sep_token": SEP}), [seq(CLS, *words(10, 12), SEP)])


def test_getitem_and_len():
    data = [seq(CLS, *words(10, 12), SEP), seq(CLS, *words(30, 15), SEP)]
    dataset = LmSeqsDataset(params(max_size=512), data)
    assert len(dataset) == 2
    ids, length = dataset[-1]
    assert (ids.tolist(), length) == (data[1].tolist(), 17)
    with pytest.raises(IndexError):
        dataset[2]
    assert len(list(dataset)) == 2  # iteration stops at IndexError


@pytest.mark.parametrize(
    "mlm, special_tok_ids, pad",
    [
        (True, MLM_IDS, PAD),
        (False, CLM_IDS, EOT),
        (False, {"bos_token": EOT, "eos_token": EOT, "unk_token": 51, "pad_token": 52}, 51),  # unknown, not pad
    ],
)
def test_batch_sequences_pads_with_pad_or_unknown_id(mlm, special_tok_ids, pad):
    start, end = (CLS, SEP) if mlm else (EOT, EOT)
    data = [seq(start, *words(10, 12), end), seq(start, *words(30, 15), end)]
    dataset = LmSeqsDataset(params(max_size=512, mlm=mlm, special_tok_ids=special_tok_ids), data)
    token_ids, lengths = dataset.batch_sequences([dataset[1], dataset[0]])
    assert token_ids.dtype == lengths.dtype == torch.int64
    assert lengths.tolist() == [17, 14]
    assert token_ids.tolist() == [
        [start, *words(30, 15), end],
        [start, *words(10, 12), end, pad, pad, pad],
    ]


def test_batch_sequences_rejects_wrong_lengths():
    dataset = LmSeqsDataset(params(), [seq(CLS, *words(10, 12), SEP)])
    ids, length = dataset[0]
    with pytest.raises(ValueError, match="do not match"):
        dataset.batch_sequences([(ids, length + 1)])


def test_distributed_loading_covers_every_sequence_once_per_epoch():
    """RandomSampler/DistributedSampler -> GroupedBatchSampler -> DataLoader(collate_fn=batch_sequences)."""
    dataset = LmSeqsDataset(params(max_size=64), random_corpus(1, 300, CLS, SEP, UNK))
    dataset = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker receives
    groups = create_lengths_groups(dataset.lengths, 64)
    n_padded = 2 * math.ceil(len(dataset) / 2)  # DistributedSampler repeats indices to even out the ranks
    epoch_orders = []
    for epoch in range(2):
        seen = []
        for rank in range(2):
            sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
            batches = GroupedBatchSampler(sampler, groups, batch_size=8)
            batches.set_epoch(epoch)
            loader = DataLoader(dataset, batch_sampler=batches, collate_fn=dataset.batch_sequences)
            for indices, (token_ids, lengths) in zip(batches, loader, strict=True):
                assert token_ids.shape == (len(indices), max(dataset.lengths[indices]))
                for i, row, n in zip(indices, token_ids, lengths):
                    assert row[:n].tolist() == dataset[i][0].tolist() and (row[n:] == PAD).all()
                seen.extend(indices)
        assert len(seen) == n_padded and set(seen) == set(range(len(dataset)))
        epoch_orders.append(seen)
    assert epoch_orders[0] != epoch_orders[1]


# ---------------------------------------------------------------- FlatCorpus (the memory-mapped format's input)


@pytest.mark.parametrize("max_size", [13, 512])
@pytest.mark.parametrize("mlm", [True, False])
def test_flat_corpus_serves_its_order_and_equals_the_slow_reference(monkeypatch, max_size, mlm):
    """Sequences stored in one order and served in another (a shuffle kept as a permutation)."""
    monkeypatch.setattr(lm_seqs_dataset, "_SCAN_BLOCK", 64)  # the unknown-token scan over many blocks
    ids = MLM_IDS if mlm else CLM_IDS
    start, end = (CLS, SEP) if mlm else (EOT, EOT)
    stored = random_corpus(7, 1000, start, end, ids["unk_token"])
    order = np.random.default_rng(0).permutation(len(stored))
    flat = FlatCorpus.from_arrays(stored)
    dataset = LmSeqsDataset(params(max_size=max_size, mlm=mlm), FlatCorpus(flat.ids, flat.offsets, order))
    served = [stored[k] for k in order]
    assert items(dataset) == slow_reference(served, max_size, start, end, ids["unk_token"])
    assert items(dataset) == items(LmSeqsDataset(params(max_size=max_size, mlm=mlm), served))


def test_items_are_views_of_the_ids_and_chunks_get_their_markers_back():
    data = [seq(CLS, *words(100, 38), SEP), seq(CLS, *words(200, 12), SEP)]
    dataset = LmSeqsDataset(params(max_size=16), data)
    assert items(dataset) == [[CLS, *words(100, 13), SEP], [CLS, *words(113, 14), SEP], [CLS, *words(127, 11), SEP],
                              [CLS, *words(200, 12), SEP]]
    assert dataset.add_start.tolist() == [False, True, True, False]
    assert dataset.add_end.tolist() == [True, True, False, False]
    whole, _ = dataset[3]
    assert np.shares_memory(whole, dataset.token_ids) and not whole.flags.writeable
    assert dataset.token_ids.size == sum(map(len, data))  # no chunk copied its ids or its markers in


@pytest.mark.parametrize(
    "offsets, order, message",
    [
        ([0, 5, 9], None, "run from 0 to 9"),
        ([0, 8, 5, 10], None, "go backwards"),
        ([1, 10], None, "run from 1 to 10"),
        ([0], None, "holds no sequence"),
        ([0, 4, 10], [0, 0], "not a permutation"),
        ([0, 4, 10], [0, 1, 2], "not a permutation"),
        ([0, 4, 10], [1, 2], "not a permutation"),
    ],
)
def test_flat_corpus_that_does_not_fit_together_raises_a_user_error(offsets, order, message):
    with pytest.raises(UserError, match=message):
        FlatCorpus(np.zeros(10, dtype=np.uint16), np.array(offsets), None if order is None else np.array(order))
