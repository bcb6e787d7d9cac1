"""Poisson sampling of the private training set (Opacus's samplers)."""

from __future__ import annotations

import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, Dataset

from dp_diffusion.privacy.engine import is_distributed


def poisson_loader(dataset: Dataset, sample_rate: float, seed: int, num_workers: int = 0) -> DataLoader:
    """Each example joins each logical batch independently with probability `sample_rate`.

    Under torch.distributed each rank Poisson-samples its own shard with the same
    rate, so the union over ranks is a Poisson batch of the whole set; each rank
    gets its own generator seed.
    """
    distributed = is_distributed()
    rank = torch.distributed.get_rank() if distributed else 0
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    return DPDataLoader(
        dataset,
        sample_rate=sample_rate,
        generator=generator,
        distributed=distributed,
        num_workers=num_workers,
    )
