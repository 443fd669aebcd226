"""Deterministic batch order: the batch for (step, micro-step, rank) is a pure function of the seed.

Each epoch is a fresh permutation drawn from a generator seeded by (seed, epoch); global batch g
takes slice g mod (batches per epoch) of epoch g div (batches per epoch). Because nothing is carried
between steps, resuming at step k replays exactly the batches a straight run would have seen.
"""

from __future__ import annotations

import torch

from moedit.data import ImageDataset


class BatchStream:
    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, grad_accum: int = 1,
                 rank: int = 0, world: int = 1):
        if len(dataset) < batch_size:
            raise ValueError(
                f"dataset {dataset.name} has {len(dataset)} images, fewer than train.batch_size={batch_size}; "
                "lower train.batch_size or add data"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.grad_accum, self.rank, self.world = grad_accum, rank, world
        self.per_epoch = len(dataset) // batch_size
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.dataset), generator=gen)
        return self._perm

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = (step * self.grad_accum + micro) * self.world + self.rank
        epoch, index = divmod(g, self.per_epoch)
        idx = self._permutation(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        return self.dataset.batch(idx)
