"""Where the privacy randomness comes from: the Poisson masks and the DP-SGD noise.

The guarantee assumes nobody can regenerate these draws, so they never come from
the config's `seed` (which sits in every checkpoint and results line), nor from
torch's global generator (which `seed_everything` seeds from it). Model
initialisation, the diffusion draws and sampling keep the ordinary `seed`.

Three sources (`privacy.*`):
- default: a 128-bit secret from OS entropy (`secrets`) drawn when the run
  starts, never logged, kept in resumable checkpoints so a resumed run continues
  the same streams (those checkpoints must be kept as private as the data;
  `PrivateTrainingModule.keep_privacy_rng_in_checkpoint=False` leaves it out of
  a released one).
- `reproducible=true`: the secret is the config's `seed` (debugging only:
  anyone with the config can regenerate the noise, so there is no guarantee).
- `secure_mode=true`: every mask and every noise draw comes from the OS's
  cryptographically secure generator (`os.urandom`), turned into uniforms,
  Bernoullis and Gaussians here. Opacus's own secure mode needs torchcsprng,
  which is unmaintained. Nothing stored can regenerate a draw, so a secure
  stream cannot be checkpointed: a resumed run draws fresh entropy.

Seeded streams are counter-based: the mask of round r on rank k and the noise of
step t come from a generator seeded with a keyed hash (BLAKE2b) of (secret,
stream, rank or device, counter). A stream's state is then (secret, counter): a
resumed run continues at its counter, ranks need only share the secret, and
Lightning's one-batch prefetch cannot shift the stream (a saved generator state
would already include the prefetched round).
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
from typing import Any

import torch
import torch.distributed as dist
from opacus.optimizers.optimizer import _generate_noise
from torch import Tensor

SECRET_BYTES = 16


def derive_seed(secret: bytes, *labels: object) -> int:
    """A 64-bit generator seed for one draw: BLAKE2b keyed with `secret`, of the labels."""
    digest = hashlib.blake2b(repr(labels).encode(), key=secret, digest_size=8).digest()
    return int.from_bytes(digest, "little")


def secure_uniform(n: int, device: torch.device | str = "cpu") -> Tensor:
    """n float64 uniforms in (0, 1) from os.urandom, 53 random bits each."""
    bits = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64) if n else torch.zeros(0, dtype=torch.int64)
    mantissa = ((bits >> 11) & (2**53 - 1)).to(torch.float64)  # the top 53 bits (the mask undoes the sign)
    return ((mantissa + 0.5) * 2.0**-53).to(device)


def secure_gaussian(std: float, reference: Tensor) -> Tensor:
    """N(0, std^2) noise shaped like `reference`, from os.urandom.

    Box-Muller in float64 on both outputs. As Opacus's secure `_generate_noise`,
    the result is the sum of four draws divided by 2, against the floating-point
    attack on a single Gaussian sample (Holohan et al., arXiv 2107.10138, 5.1).
    Cost, 2M float32 parameters on a shared 2-core CPU: 1.3-1.7 s per step against
    15-56 ms for one `torch.normal` (64 MB of os.urandom at ~150 MB/s, then float64
    Box-Muller; `measure_secure_noise()` measures it).
    """
    n = reference.numel()
    half = (4 * n + 1) // 2
    radius = torch.sqrt(-2.0 * torch.log(secure_uniform(half)))
    angle = (2.0 * math.pi) * secure_uniform(half)
    draws = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[: 4 * n]
    total = draws.view(4, n).sum(dim=0)
    noise = total * (std / 2.0)
    return noise.to(device=reference.device, dtype=reference.dtype).view_as(reference)


class PrivacyRandomness:
    """The masks' and the noise's source for one run; see the module docstring for the three kinds."""

    def __init__(self, kind: str, secret: bytes | None = None) -> None:
        if kind not in ("entropy", "reproducible", "secure"):
            raise ValueError(f"unknown privacy randomness {kind!r}")
        if (secret is None) != (kind == "secure"):
            raise ValueError("a seeded stream needs a secret; a secure one has none")
        self.kind = kind
        self.secret = secret

    @classmethod
    def for_run(cls, secure_mode: bool, reproducible: bool, seed: int) -> PrivacyRandomness:
        """A fresh source for a run's settings; `seed` (the config's) is used only when `reproducible`."""
        if secure_mode:
            return cls("secure")
        if reproducible:
            return cls("reproducible", f"config seed {int(seed)}".encode())
        return cls("entropy", secrets.token_bytes(SECRET_BYTES))

    @property
    def checkpointable(self) -> bool:
        return self.kind != "secure"

    def share_from_rank0(self) -> None:
        """Under torch.distributed, every rank takes rank 0's secret (per-rank streams are derived from it).

        All ranks must call this. Secure streams have no secret: each rank draws its own.
        """
        if self.kind == "secure" or not (dist.is_available() and dist.is_initialized()):
            return
        box = [self.secret]
        dist.broadcast_object_list(box, src=0)
        self.secret = box[0]

    def poisson_mask(self, round_index: int, rank: int, n: int, sample_rate: float) -> Tensor:
        """Bool mask of n examples, each True with probability `sample_rate`, for round `round_index` on `rank`."""
        if self.kind == "secure":
            return secure_uniform(n) < sample_rate
        generator = torch.Generator().manual_seed(derive_seed(self.secret, "mask", rank, round_index))
        return torch.rand(n, generator=generator, dtype=torch.float64) < sample_rate

    def noise_generator(self, step: int, device: torch.device) -> torch.Generator:
        """The generator for noise step `step` on `device` (seeded streams only)."""
        if self.kind == "secure":
            raise ValueError("a secure stream has no generator: use secure_gaussian")
        return torch.Generator(device=device).manual_seed(derive_seed(self.secret, "noise", step, str(device)))

    def state_dict(self) -> dict[str, Any]:
        """The secret, for a resumable checkpoint: as private as the data."""
        return {"kind": self.kind, "secret": self.secret}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"stored privacy randomness is {state['kind']!r}, this run's is {self.kind!r}")
        if self.checkpointable:
            self.secret = state["secret"]


class NoiseStream:
    """The DP optimizer's noise: one draw per step, counted so a resumed run continues the stream.

    `source=None` draws from torch's global generator, as Opacus does without a
    generator: for tests and benchmarks that construct the engine directly.
    The training module always passes its run's source.
    """

    def __init__(self, source: PrivacyRandomness | None, steps_drawn: int = 0) -> None:
        self.source = source
        self.steps_drawn = steps_drawn

    def draw_step(self, std: float, references: list[Tensor]) -> list[Tensor]:
        """N(0, std^2) noise like each reference tensor, for one logical step; advances the stream by one step."""
        step, self.steps_drawn = self.steps_drawn, self.steps_drawn + 1
        if std == 0:
            return [torch.zeros_like(r) for r in references]
        if self.source is not None and self.source.kind == "secure":
            return [secure_gaussian(std, r) for r in references]
        generators: dict[torch.device, torch.Generator] = {}
        noise = []
        for r in references:
            generator = None
            if self.source is not None:
                if r.device not in generators:
                    generators[r.device] = self.source.noise_generator(step, r.device)
                generator = generators[r.device]
            noise.append(_generate_noise(std=std, reference=r, generator=generator, secure_mode=False))
        return noise

    def skip_step(self) -> None:
        """Advance without drawing (ranks that add no noise keep the same count as rank 0)."""
        self.steps_drawn += 1


def measure_secure_noise() -> None:
    """Prints the cost of secure noise against torch.normal for a 2M-parameter float32 tensor."""
    import time

    reference = torch.zeros(2_000_000)
    for name, fn in (("torch.normal", lambda: torch.normal(0.0, 1.0, size=reference.shape)),
                     ("secure_gaussian", lambda: secure_gaussian(1.0, reference))):
        fn()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        print(f"{name}: {(time.perf_counter() - start) / 3 * 1e3:.0f} ms per 2M-parameter step")
