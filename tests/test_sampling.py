"""Poisson rounds (`privacy.sampling.PoissonRounds`) and the privacy randomness they draw from."""

from __future__ import annotations

import math

import pytest
import torch

from dp_diffusion.privacy.randomness import NoiseStream, PrivacyRandomness, secure_gaussian
from dp_diffusion.privacy.sampling import PoissonRounds, poisson_loader


def seeded(seed: int = 0) -> PrivacyRandomness:
    return PrivacyRandomness.for_run(secure_mode=False, reproducible=True, seed=seed)


def epoch(sampler: PoissonRounds) -> list[list[int]]:
    return list(iter(sampler))


def within_binomial(hits: int, trials: int, rate: float, sds: float = 4.0) -> bool:
    return abs(hits - trials * rate) <= sds * math.sqrt(trials * rate * (1 - rate))


def test_every_rank_takes_every_round_even_empty_ones():
    """Two expected examples per rank (q = 0.05, 40 examples each): all ranks take int(1/q) rounds per
    epoch, empty rounds included, and each example joins a round with probability q."""
    n, q, world = 80, 0.05, 2
    samplers = [PoissonRounds(n, q, seeded(), rank=r, world_size=world) for r in range(world)]
    rounds = [[b for _ in range(50) for b in epoch(s)] for s in samplers]
    assert [len(r) for r in rounds] == [50 * 20] * world
    assert all(any(len(b) == 0 for b in r) for r in rounds), "a tiny per-rank batch must give empty rounds"
    for r, batches in enumerate(rounds):
        assert all(i % world == r for b in batches for i in b)  # each rank its own shard
        assert within_binomial(sum(map(len, batches)), len(batches) * n // world, q)
    per_example = torch.bincount(torch.tensor([i for r in rounds for b in r for i in b]), minlength=n)
    assert per_example.min() > 0


def test_resumed_sampler_continues_the_mask_stream_to_the_end_of_the_epoch():
    uninterrupted = PoissonRounds(100, 0.1, seeded(), rank=1, world_size=2)
    first, second = epoch(uninterrupted), epoch(uninterrupted)
    resumed = PoissonRounds(100, 0.1, seeded(), rank=1, world_size=2, start_round=13)
    assert epoch(resumed) == second[3:]  # round 13 is round 3 of the second epoch
    assert epoch(resumed) == epoch(uninterrupted)
    assert first != second


def test_masks_differ_between_rounds_ranks_and_entropy_secrets():
    a, b = (PrivacyRandomness.for_run(secure_mode=False, reproducible=False, seed=0) for _ in range(2))
    assert a.secret != b.secret
    masks = [a.poisson_mask(0, 0, 500, 0.3), a.poisson_mask(1, 0, 500, 0.3), a.poisson_mask(0, 1, 500, 0.3),
             b.poisson_mask(0, 0, 500, 0.3)]
    assert all(not torch.equal(x, y) for i, x in enumerate(masks) for y in masks[i + 1:])
    assert torch.equal(seeded(3).poisson_mask(4, 0, 500, 0.3), seeded(3).poisson_mask(4, 0, 500, 0.3))


def test_secure_masks_and_noise_have_the_right_rate_and_std():
    secure = PrivacyRandomness.for_run(secure_mode=True, reproducible=False, seed=0)
    assert secure.secret is None and not secure.checkpointable
    hits = sum(int(secure.poisson_mask(r, 0, 1000, 0.02).sum()) for r in range(20))
    assert within_binomial(hits, 20_000, 0.02)
    noise = secure_gaussian(0.7, torch.zeros(200_000))
    assert noise.dtype == torch.float32 and noise.std().item() == pytest.approx(0.7, rel=0.01)
    assert abs(noise.mean().item()) < 4 * 0.7 / math.sqrt(noise.numel())


def test_seeded_noise_stream_resumes_at_its_step_count():
    refs = [torch.zeros(30), torch.zeros(2, 3)]
    stream = NoiseStream(seeded())
    steps = [stream.draw_step(1.0, refs) for _ in range(3)]
    resumed = NoiseStream(seeded(), steps_drawn=2)
    for got, want in zip(resumed.draw_step(1.0, refs), steps[2]):
        torch.testing.assert_close(got, want)
    assert not torch.equal(steps[0][0], steps[1][0])


def test_loader_yields_empty_batches_with_the_example_shape():
    data = torch.utils.data.TensorDataset(torch.randn(40, 3), torch.arange(40))
    loader = poisson_loader(data, 0.01, seeded(1))
    batches = list(loader)
    assert len(batches) == len(loader) == 100
    empty = [b for b in batches if len(b[1]) == 0]
    assert empty and empty[0][0].shape == (0, 3)
