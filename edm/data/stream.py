"""Data order: a pure function of (seed, epoch), so a resumed run starts at the exact position and every
number of processes sees the same batches.

StreamBatchSampler walks the stream P_0 ‖ P_1 ‖ ... of per-epoch permutations.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["epoch_permutation", "micro_batch_start", "StreamBatchSampler", "make_loader"]


def epoch_permutation(num_items: int, seed: int, epoch: int) -> Tensor:
    """P_epoch: a permutation of range(num_items) that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
    return torch.randperm(num_items, generator=generator)


def micro_batch_start(nimg: int, accum_round: int, rank: int, world_size: int, micro_batch: int) -> int:
    """The stream position of micro-batch `accum_round` of process `rank` in the step that starts after `nimg`
    images: chunk (accum_round·W + rank) of size `micro_batch`."""
    return nimg + (accum_round * world_size + rank) * micro_batch


class StreamBatchSampler:
    """Index lists for one process. The data stream is P_0 ‖ P_1 ‖ ... (P_e = epoch_permutation);
    an optimizer step that starts after n images takes stream items [n, n + B) (B = global
    batch), and its micro-batch a of `accum` for process r of W is the chunk (a·W + r) of
    size b. So every step sees the same B items whatever W is, and a run resumed at n images
    continues exactly. Starts at `start_nimg`; endless."""

    def __init__(
        self, num_items: int, seed: int, batch_size: int, micro_batch: int, rank: int = 0, world_size: int = 1,
        start_nimg: int = 0,
    ) -> None:
        if num_items < 1:
            raise ValueError("the data set is empty")
        if batch_size % (micro_batch * world_size) != 0:
            raise ValueError(
                f"batch_size={batch_size} must be a multiple of batch_per_device ({micro_batch}) x processes ({world_size})"
            )
        self.num_items, self.seed, self.batch_size, self.micro_batch = num_items, seed, batch_size, micro_batch
        self.rank, self.world_size, self.start_nimg = rank, world_size, start_nimg
        self.accum = batch_size // (micro_batch * world_size)
        self._cache: tuple[int, Tensor] | None = None

    def _epoch(self, epoch: int) -> Tensor:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, epoch_permutation(self.num_items, self.seed, epoch))
        return self._cache[1]

    def micro_batch_indices(self, nimg: int, accum_round: int) -> list[int]:
        """Indices of micro-batch `accum_round` of the step that starts after `nimg` images, for this process."""
        start = micro_batch_start(nimg, accum_round, self.rank, self.world_size, self.micro_batch)
        out: list[int] = []
        while len(out) < self.micro_batch:
            epoch, offset = divmod(start + len(out), self.num_items)
            take = min(self.micro_batch - len(out), self.num_items - offset)
            out += self._epoch(epoch)[offset : offset + take].tolist()
        return out

    def __iter__(self) -> Iterator[list[int]]:
        nimg = self.start_nimg
        while True:
            for accum_round in range(self.accum):
                yield self.micro_batch_indices(nimg, accum_round)
            nimg += self.batch_size


def make_loader(
    dataset: Dataset, sampler: StreamBatchSampler, num_workers: int = 0, pin_memory: bool = False,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """DataLoader over `sampler`'s index lists; workers and pinned memory as asked. It gets its own
    generator (for worker seeds), so starting it never draws from the global RNG: resume stays exact."""
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=worker_init_fn,
        generator=torch.Generator().manual_seed(sampler.seed),
    )
