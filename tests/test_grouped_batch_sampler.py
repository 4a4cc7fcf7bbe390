"""create_lengths_groups and GroupedBatchSampler against slow references written from SPEC §5."""

import bisect
import logging
import math
from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DistributedSampler, RandomSampler, Sampler, SequentialSampler

from grouped_batch_sampler import GroupedBatchSampler, create_lengths_groups


class FixedOrder(Sampler[int]):
    """A base sampler that yields a given order, so the reference can walk the same one."""

    def __init__(self, order: list[int]):
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def reference_groups(lengths: list[int], k: int) -> list[int]:
    bins = list(range(3, k, 4)) if k > 0 else [10]
    return [bisect.bisect_right(bins, length) for length in lengths]


def reference_batches(order: list[int], groups: list[int], batch_size: int) -> list[list[int]]:
    """Walk the order, emit a group's buffer when full; then the leftovers in group order, in slices."""
    buffers: dict[int, list[int]] = {}
    batches = []
    for index in order:
        buffer = buffers.setdefault(groups[index], [])
        buffer.append(index)
        if len(buffer) == batch_size:
            batches.append(buffer)
            buffers[groups[index]] = []
    leftovers = []
    for group in sorted(buffers):
        leftovers += buffers[group]
    batches += [leftovers[i : i + batch_size] for i in range(0, len(leftovers), batch_size)]
    return batches


def test_groups_by_hand(caplog):
    with caplog.at_level(logging.INFO):
        groups = create_lengths_groups(np.array([1, 3, 6, 7, 11, 100]), 12)
    assert groups.tolist() == [0, 1, 1, 2, 3, 3]  # bins 3, 7, 11
    assert "edges [3, 7, 11]" in caplog.text
    assert "Count of instances per bin: [1, 2, 1, 2]" in caplog.text


@pytest.mark.parametrize("k", [0, -5, 3, 4, 12, 512])
def test_groups_equal_the_reference(k):
    lengths = np.random.default_rng(k + 10).integers(1, 600, 1000)
    assert create_lengths_groups(lengths, k).tolist() == reference_groups(lengths.tolist(), k)


@pytest.mark.parametrize("n, n_groups, batch_size", [(1, 1, 4), (10, 3, 3), (257, 5, 8), (1000, 40, 32), (64, 2, 64)])
def test_batches_equal_the_reference_and_keep_the_contract(n, n_groups, batch_size):
    rng = np.random.default_rng(n)
    groups = rng.integers(0, n_groups, n).tolist()
    order = rng.permutation(n).tolist()
    sampler = GroupedBatchSampler(FixedOrder(order), groups, batch_size)
    batches = list(sampler)
    assert batches == reference_batches(order, groups, batch_size)
    # Every index exactly once; len is the number of batches.
    assert sorted(i for batch in batches for i in batch) == list(range(n))
    assert len(sampler) == len(batches) == math.ceil(n / batch_size)
    # Full batches emitted while walking are single-group; the leftovers follow in group order.
    n_full = sum(count // batch_size for count in Counter(groups).values())
    assert all(len({groups[i] for i in batch}) == 1 for batch in batches[:n_full])
    leftovers = [groups[i] for batch in batches[n_full:] for i in batch]
    assert leftovers == sorted(leftovers)
    assert all(len(batch) == batch_size for batch in batches[:-1])


def test_batches_by_hand():
    groups = [0, 1, 0, 1, 2, 2, 0, 1, 2, 0]
    assert list(GroupedBatchSampler(SequentialSampler(range(10)), groups, 3)) == [
        [0, 2, 6],
        [1, 3, 7],
        [4, 5, 8],
        [9],
    ]
    # Leftovers of several groups: 2 from group 1, 1 from group 0, 2 from group 2 -> in group order.
    groups = [1, 2, 0, 1, 2]
    assert list(GroupedBatchSampler(SequentialSampler(range(5)), groups, 4)) == [[2, 0, 3, 1], [4]]


def test_a_random_base_sampler_gives_every_index_once_per_epoch():
    groups = np.random.default_rng(0).integers(0, 6, 500)
    sampler = GroupedBatchSampler(RandomSampler(range(500)), groups, 16)
    for _ in range(2):
        assert sorted(i for batch in sampler for i in batch) == list(range(500))


def test_non_sampler_base_is_a_type_error():
    with pytest.raises(TypeError, match="torch.utils.data.Sampler"):
        GroupedBatchSampler(list(range(10)), [0] * 10, 2)


def test_set_epoch_reaches_the_distributed_sampler():
    data = range(100)
    groups = [0] * 100
    sampler = GroupedBatchSampler(DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=0), groups, 10)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    assert list(sampler) == epoch0  # without set_epoch the order repeats
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    GroupedBatchSampler(RandomSampler(data), groups, 10).set_epoch(1)  # no set_epoch on the base: nothing to do
