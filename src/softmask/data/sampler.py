"""A distributed, resumable sampler whose global batches do not depend on the number of processes.

Each epoch, one permutation of the dataset is drawn from a ``torch.Generator`` seeded with
``(seed, epoch)`` (the same on every rank) and cut to a whole number of global batches of
``batch_size * world_size`` samples (drop_last). Global batch ``b`` is ``perm[b*G:(b+1)*G]`` with
``G = batch_size * world_size``, and rank ``r`` takes its slice ``[r*batch_size:(r+1)*batch_size]``.
So a run on 2 processes with batch 32 sees, at every step, exactly the samples a 1-process run with
batch 64 sees (the permutation does not depend on ``world_size`` or ``rank``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several non-negative integers (e.g. seed, epoch, rank), well mixed."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class ResumableSampler(Sampler):
    """Yields ``(index, epoch)`` tuples: this rank's samples of the current epoch, batch by batch.

    Args:
        num_samples: dataset size.
        batch_size: samples per batch on each rank.
        rank, world_size: this process and the number of processes.
        seed: base seed; the epoch's permutation comes from ``(seed, epoch)``.
        shuffle: False keeps the dataset order (still cut to whole global batches).

    Raises:
        ValueError: the dataset is smaller than one global batch, or an argument is out of range.
    """

    def __init__(
        self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1, world_size >= 1 and 0 <= rank < world_size; "
                f"got batch_size={batch_size}, rank={rank}, world_size={world_size}"
            )
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of {global_batch} "
                f"(batch_size {batch_size} x {world_size} processes); add data or lower train.batch_size"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank in a full epoch (the same on every rank), skipped ones included."""
        return self.num_samples // self.global_batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its permutation) and reset the start batch to 0."""
        self.epoch = epoch
        self.start_batch = 0

    def set_start_batch(self, k: int) -> None:
        """Skip this rank's first ``k`` batches of the current epoch (for resuming mid-epoch)."""
        if not 0 <= k <= self.batches_per_epoch:
            raise ValueError(f"start batch must be in [0, {self.batches_per_epoch}], got {k}")
        self.start_batch = k

    def permutation(self) -> torch.Tensor:
        """The current epoch's order of all ``num_samples`` indices, (num_samples,) long."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def rank_indices(self) -> torch.Tensor:
        """This rank's remaining indices this epoch, (len(self),) long, in yield order."""
        g, b = self.global_batch_size, self.batch_size
        batches = self.permutation()[: self.batches_per_epoch * g].view(self.batches_per_epoch, g)
        mine = batches[self.start_batch:, self.rank * b:(self.rank + 1) * b]
        return mine.reshape(-1)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in self.rank_indices().tolist():
            yield index, epoch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
