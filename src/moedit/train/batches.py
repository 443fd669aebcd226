"""Deterministic batch order: the batch for (step, micro-step, rank) is a pure function of the seed.

Each epoch is a fresh permutation drawn from a generator seeded by (seed, epoch); global batch g
takes slice g mod (batches per epoch) of epoch g div (batches per epoch). Because nothing is carried
between steps, resuming at step k replays exactly the batches a straight run would have seen, mid-epoch
included; the checkpoint records the position (`position`) and the resume checks it still means the same
batches (`check_position`: another dataset size, batch size, world size or seed would not).

Each rank reads only its own batch: g = (step · grad_accum + micro) · world + rank.

Lazily read data (a lazy image folder, latent stores, the peers' latent files) is loaded by `workers`
DataLoader processes: they read items (`dataset.item(i)`, deterministic) ahead of the step, and the main
process assembles each batch (`dataset.collate`), which is where any randomness (posterior noise, the
flipped view) is drawn, from the checkpointed RNG: the same batches with 0 workers or 8.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class BatchStream:
    def __init__(self, dataset, batch_size: int, seed: int, grad_accum: int = 1, rank: int = 0, world: int = 1,
                 workers: int = 0):
        if len(dataset) < batch_size:
            raise ValueError(
                f"dataset {dataset.name} has {len(dataset)} images, fewer than train.batch_size={batch_size}; "
                "lower train.batch_size or add data"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.grad_accum, self.rank, self.world = grad_accum, rank, world
        self.per_epoch = len(dataset) // batch_size
        self._epoch, self._perm = -1, None
        self.workers = workers if hasattr(dataset, "item") else 0  # in-memory data is faster read directly
        self._loader: Iterator | None = None
        self._next = (0, 0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.dataset), generator=gen)
        return self._perm

    def indices(self, step: int, micro: int = 0) -> torch.Tensor:
        g = (step * self.grad_accum + micro) * self.world + self.rank
        epoch, index = divmod(g, self.per_epoch)
        return self._permutation(epoch)[index * self.batch_size : (index + 1) * self.batch_size]

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.workers:
            return self.dataset.batch(self.indices(step, micro))
        if self._loader is None or (step, micro) != self._next:  # first call, or a jump: restart the workers there
            self.close()
            self._loader = iter(self._data_loader(step, micro))
        self._next = (step, micro + 1) if micro + 1 < self.grad_accum else (step + 1, 0)
        return self.dataset.collate(next(self._loader))

    def close(self) -> None:
        """Stop the workers now (not when the iterator is collected: a process forked meanwhile would
        inherit it and try to stop workers that are not its children)."""
        loader, self._loader = self._loader, None
        if loader is not None and hasattr(loader, "_shutdown_workers"):
            loader._shutdown_workers()

    def _data_loader(self, step: int, micro: int) -> torch.utils.data.DataLoader:
        stream = self

        class Indices(torch.utils.data.Sampler):
            def __iter__(self):
                s, m = step, micro
                while True:
                    yield stream.indices(s, m).tolist()
                    s, m = (s, m + 1) if m + 1 < stream.grad_accum else (s + 1, 0)

        # its own generator: starting workers must not draw from the global RNG the batches' noise comes from
        seeds = torch.Generator().manual_seed(self.seed * 7919 + step)
        return torch.utils.data.DataLoader(_Items(self.dataset), batch_sampler=Indices(), num_workers=self.workers,
                                           collate_fn=list, prefetch_factor=2, generator=seeds)

    def position(self, step: int) -> dict:
        """Where the next batch comes from, as the checkpoint records it."""
        g = step * self.grad_accum * self.world
        return {"epoch": g // self.per_epoch, "batch_in_epoch": g % self.per_epoch, "batches_per_epoch": self.per_epoch,
                "dataset_size": len(self.dataset), "batch_size": self.batch_size, "world": self.world,
                "grad_accum": self.grad_accum, "seed": self.seed}

    def check_position(self, saved: dict | None, step: int) -> str | None:
        """None when resuming at `step` continues the saved order batch for batch, else what differs."""
        if not saved:
            return None
        now = self.position(step)
        differ = [k for k in ("dataset_size", "batch_size", "world", "grad_accum", "seed", "epoch", "batch_in_epoch")
                  if saved.get(k) != now[k]]
        if not differ:
            return None
        return ("the batch order differs from the saved run's (" + ", ".join(f"{k} {saved.get(k)} → {now[k]}"
                                                                          for k in differ) + "): the resumed run "
                "sees other batches than a straight run would")


class _Items(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset.item(i)
