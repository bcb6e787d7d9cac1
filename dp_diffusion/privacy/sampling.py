"""Poisson sampling of the private training set: one (possibly empty) batch per round on every rank.

Written by hand rather than taken from Opacus (`UniformWithReplacementSampler`,
`DistributedUniformWithReplacementSampler`) for two reasons:
- Opacus's distributed sampler skips a rank's empty local batch, so under DDP
  with a small per-rank batch each rank's inclusion rate rises above q (by
  about 16% at two expected examples per rank) and ranks take different
  numbers of steps. Here every rank yields exactly one batch per round, empty or not,
  and the same number of rounds per epoch; a round whose global batch is
  empty is a noise-only step.
- Both Opacus samplers draw from one generator whose state after a round
  cannot be saved at the right moment under Lightning (it prefetches a batch).
  Here the mask of round r comes from the run's `PrivacyRandomness` at counter
  r, so a resumed run starts at the round it stopped at.
Empty batches are collated by Opacus's `wrap_collate_with_empty`.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from dp_diffusion.privacy.randomness import PrivacyRandomness


class PoissonRounds(Sampler[list[int]]):
    """Each example joins each round's batch independently with probability `sample_rate`.

    Rank k of `world_size` holds the examples k, k + world_size, ... (a fixed,
    public split: with independent Bernoulli draws the split plays no part in
    the guarantee) and yields one list of indices per round, possibly empty.
    An epoch is int(1/q) rounds on every rank. Iteration starts at round
    `next_round` and runs to the end of that round's epoch, so a sampler built
    with `start_round=r` continues a run that took r rounds.
    """

    def __init__(self, num_examples: int, sample_rate: float, randomness: PrivacyRandomness,
                 rank: int = 0, world_size: int = 1, start_round: int = 0) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.indices = torch.arange(rank, num_examples, world_size)
        self.sample_rate = sample_rate
        self.randomness = randomness
        self.rank = rank
        self.rounds_per_epoch = max(1, int(1 / sample_rate))
        self.next_round = start_round

    def __len__(self) -> int:
        return self.rounds_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        epoch_end = (self.next_round // self.rounds_per_epoch + 1) * self.rounds_per_epoch
        while self.next_round < epoch_end:
            mask = self.randomness.poisson_mask(self.next_round, self.rank, len(self.indices), self.sample_rate)
            self.next_round += 1
            yield self.indices[mask].tolist()


def poisson_loader(dataset: Dataset, sample_rate: float, randomness: PrivacyRandomness, start_round: int = 0,
                   num_workers: int = 0) -> DataLoader:
    """A loader of Poisson batches (`PoissonRounds`) for this process's rank, starting at round `start_round`.

    `sample_rate` is q of the global batch: under torch.distributed each rank
    samples its own shard at the same rate, so the union over ranks is a Poisson
    batch of the whole set.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    sampler = PoissonRounds(len(dataset), sample_rate, randomness, rank, world_size, start_round)
    first = dataset[0]
    collate = wrap_collate_with_empty(collate_fn=default_collate,
                                      sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                                      dtypes=[dtype_safe(x) for x in first])
    # The loader's own generator only seeds worker processes; it keeps the
    # loader from drawing that seed from torch's global generator, whose stream
    # (the diffusion draws) a resumed run restores.
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(0))
