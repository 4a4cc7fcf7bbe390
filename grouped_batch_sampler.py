"""Batches of sequences of similar length, so that little of each batch is padding."""

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import BatchSampler, Sampler

from utils import logger


def create_lengths_groups(lengths: Sequence[int] | np.ndarray, k: int = 0) -> np.ndarray:
    """Group sequence lengths into bins with edges 3, 7, 11, ... below `k`.

    Args:
        lengths: (n_sequences,) length of every sequence.
        k: upper limit of the bin edges, normally the maximum model input size; with k <= 0 there
            is a single edge, 10.

    Returns:
        groups: (n_sequences,) int64, the group of each sequence: the number of edges <= its length.
    """
    bins = list(range(3, k, 4)) if k > 0 else [10]
    groups = np.searchsorted(bins, np.asarray(lengths), side="right")
    logger.info("Using %d length bins with edges %s", len(bins), bins)
    logger.info("Count of instances per bin: %s", np.bincount(groups, minlength=len(bins) + 1).tolist())
    return groups


class GroupedBatchSampler(BatchSampler):
    """Wraps a sampler so that every full batch holds indices of a single group (of similar lengths).

    The base sampler's order is followed: an index joins its group's buffer, and a batch is emitted as
    soon as one buffer holds `batch_size` indices. At the end of the epoch the leftover indices are
    concatenated in group order and emitted in batches of `batch_size`, the last possibly shorter.
    Every index of the base sampler appears exactly once per epoch.

    Args:
        sampler: base sampler, e.g. RandomSampler or DistributedSampler over the dataset.
        group_ids: (n_sequences,) group of every dataset index, from `create_lengths_groups`.
        batch_size: indices per batch.

    Raises:
        TypeError: `sampler` is not a torch.utils.data.Sampler.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int] | np.ndarray, batch_size: int):
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler should be an instance of torch.utils.data.Sampler, but got {sampler!r}")
        super().__init__(sampler, batch_size, drop_last=False)
        self.group_ids = np.asarray(group_ids)

    def __iter__(self) -> Iterator[list[int]]:
        buffers: defaultdict[int, list[int]] = defaultdict(list)
        for index in self.sampler:
            group = int(self.group_ids[index])
            buffers[group].append(index)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
        leftovers = [index for group in sorted(buffers) for index in buffers[group]]
        for start in range(0, len(leftovers), self.batch_size):
            yield leftovers[start : start + self.batch_size]

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the base sampler if it has one (DistributedSampler reshuffles with it).

        The original never called it, so every epoch of a distributed run saw the same order.
        """
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
