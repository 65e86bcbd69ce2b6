"""Data loaders whose order is a pure function of (seed, iteration): resumable and sharded.

Training reads an endless stream of positions 0, 1, 2, ...; position ``p`` is sample
``permutation(epoch)[p % N]`` with ``epoch = p // N``, augmented with a seed derived from
``p``. Iteration ``i`` of a run with ``W`` processes of batch ``B`` covers the global
positions ``[i*W*B, (i+1)*W*B)``, process ``r`` taking the ``r``-th block of ``B``. So a
resumed run only needs the iteration count, and ``W`` processes see exactly the batches
one process of batch ``W*B`` sees.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def sample_seed(seed: int, position: int, stream: int = 0) -> int:
    """A 32-bit seed for (run seed, position); ``stream`` separates independent uses."""
    return int(np.random.SeedSequence([seed, stream, position]).generate_state(1, np.uint32)[0])


class TrainSampler(Sampler[tuple[int, int]]):
    """Endless ``(index, augmentation seed)`` stream for one process (see module docstring)."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        seed: int,
        start_iteration: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if size < 1:
            raise ValueError("cannot sample from an empty data set")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.start_iteration = start_iteration
        self.rank = rank
        self.world_size = world_size

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, stream=1))
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, permutation = -1, []
        iteration = self.start_iteration
        while True:
            first = (iteration * self.world_size + self.rank) * self.batch_size
            for position in range(first, first + self.batch_size):
                if position // self.size != epoch:
                    epoch = position // self.size
                    permutation = self._permutation(epoch)
                yield permutation[position % self.size], sample_seed(self.seed, position)
            iteration += 1


class ShardSampler(Sampler[int]):
    """Every index exactly once over all processes (process r takes r, r+W, ...), no padding."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = zip(*batch)
    sizes = {tuple(image.shape[-2:]) for image in images}
    if len(sizes) > 1:
        raise ValueError(
            f"cannot batch images of different sizes {sorted(sizes)}; "
            "set data.val_batch_size=1 for data sets whose images differ in size"
        )
    return torch.stack(images), torch.stack(masks)


def train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    start_iteration: int,
    workers: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    sampler = TrainSampler(
        len(dataset),
        batch_size,
        seed=seed,
        start_iteration=start_iteration,
        rank=rank,
        world_size=world_size,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        # A private generator: creating the loader's iterator must not draw from the
        # global RNG, or a resumed run's dropout stream would shift.
        generator=torch.Generator().manual_seed(seed),
    )


def eval_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    workers: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        # Kept between evaluations: a cached procedural data set then draws each image once.
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
